"""Text samples during training: greedy continuations of fixed prompts, to TensorBoard and the log.

Every `train.sample_every` steps the loop calls `Sampler.write(writer, step, params)`. The
prompts are shaped like the embedded corpus (data/corpus.py: stories, facts, sums, dialogues),
so a model learning it shows it in the samples within a few hundred steps. Decoding is the
project's own (train/generate.py Generator: KV cache, jitted once per shape bucket), from the
current params as they lie sharded on the training mesh. Greedy, so the same params always
give the same text and a change between two samples is a change of the model.

TensorBoard gets one text entry per prompt (`samples/0`, `samples/1`, ...; TEXT tab).
"""

import logging

import jax

from train.generate import Generator

log = logging.getLogger('meshlm')

PROMPTS = ('On Monday, Alice went to', 'The capital of France is', 'Bob: What is 3 + 4?\nAlice:')
MAX_NEW_TOKENS = 24


class Sampler:
  """Continues `prompts` with the params given at each call (greedy, `max_new_tokens`)."""

  def __init__(self, cfg, tokenizer, mesh, rules, prompts=PROMPTS, max_new_tokens=MAX_NEW_TOKENS):
    self.prompts, self.max_new_tokens = tuple(prompts), max_new_tokens
    self.generator = Generator(cfg, None, tokenizer, mesh, rules, max_batch=len(self.prompts))
    # The decoder reads whole (batch-sharded) token buffers back on the host.
    self.enabled = jax.process_count() == 1
    if not self.enabled:
      log.warning('train.sample_every: text samples are off in multi-process runs')

  def __call__(self, params) -> list[str]:
    """The completion of each prompt (text only, prompt excluded)."""
    out = self.generator.generate(list(self.prompts), max_new_tokens=self.max_new_tokens,
                                  params=params)
    return [c.text for c in out]

  def write(self, writer, step: int, params) -> list[str]:
    if not self.enabled:
      return []
    completions = self(params)
    for i, (prompt, text) in enumerate(zip(self.prompts, completions)):
      writer.text(step, f'samples/{i}', markdown(prompt, text))
      log.info('step %d sample %d: %r -> %r', step, i, prompt, text)
    return completions


def markdown(prompt: str, completion: str) -> str:
  """The prompt in bold, then the completion; line breaks kept (TensorBoard renders markdown)."""
  escape = lambda s: ''.join('\\' + ch if ch in '\\`*_{}[]<>#|' else ch for ch in s)
  return f'**{escape(prompt)}**{escape(completion)}'.replace('\n', '  \n')
