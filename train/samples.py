"""Text samples during training (`train.sample_every`): greedy continuations of fixed prompts from
the params as they lie sharded, to TensorBoard (`samples/0`, ...) and the log."""

import logging

import jax

from train.generate import Generator

log = logging.getLogger('meshlm')

PROMPTS = ('On Monday, Alice went to', 'The capital of France is', 'Bob: What is 3 + 4?\nAlice:')
MAX_NEW_TOKENS = 24


class Sampler:
  """Continues PROMPTS with the params given at each call (greedy, MAX_NEW_TOKENS)."""

  def __init__(self, cfg, tokenizer, mesh, rules):
    self.generator = Generator(cfg, None, tokenizer, mesh, rules, max_batch=len(PROMPTS))
    # The decoder reads whole (batch-sharded) token buffers back on the host.
    self.enabled = jax.process_count() == 1
    if not self.enabled:
      log.warning('train.sample_every: text samples are off in multi-process runs')

  def write(self, writer, step: int, params) -> list[str]:
    """The completion of each prompt (text only), also written to `writer` and the log."""
    if not self.enabled:
      return []
    out = self.generator.generate(list(PROMPTS), max_new_tokens=MAX_NEW_TOKENS, params=params)
    for i, (prompt, c) in enumerate(zip(PROMPTS, out)):
      writer.text(step, f'samples/{i}', markdown(prompt, c.text))
      log.info('step %d sample %d: %r -> %r', step, i, prompt, c.text)
    return [c.text for c in out]


def markdown(prompt: str, completion: str) -> str:
  """The prompt in bold, then the completion; line breaks kept (TensorBoard renders markdown)."""
  escape = lambda s: ''.join('\\' + ch if ch in '\\`*_{}[]<>#|' else ch for ch in s)
  return f'**{escape(prompt)}**{escape(completion)}'.replace('\n', '  \n')
