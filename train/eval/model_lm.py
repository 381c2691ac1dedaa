"""`LanguageModel` (train/eval/lm.py) over a meshlm model, through train/generate.py's Generator.

loglikelihood: tokenised as the reference harness does (trailing spaces of the context move to the
continuation; the continuation's ids are those of context + continuation after the context's ids
when the context tokenises the same alone), BOS first, cut on the left to `max_length`, scored in
length-sorted batches padded to power-of-two buckets. generate: prompts cut on the left so that
prompt + new tokens fit `max_length` when they can; `num_samples` independent samples each.
"""

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from model import decode
from train import generate as gen_lib
from train import step as step_lib


def _progress(total: int, desc: str):
  return tqdm(total=total, desc=desc, unit='req', dynamic_ncols=True, leave=False, disable=None)


class MeshLM:
  """A LanguageModel backed by a Generator (its params, tokenizer, mesh)."""

  def __init__(self, generator: gen_lib.Generator, *, max_length: int, batch_size: int = 16,
               min_bucket: int = 16):
    self.gen, self.tok = generator, generator.tokenizer
    self.max_length, self.batch_size, self.min_bucket = max_length, batch_size, min_bucket
    mdef = generator.mdef

    def score(params, tokens_bt, mask_bt):
      logits_btv, _ = mdef.build(params)(tokens_bt[:, :-1])
      return -jnp.sum(step_lib.token_nll(logits_btv, tokens_bt[:, 1:]) * mask_bt[:, 1:], axis=-1)

    self._score = jax.jit(score)

  def count_tokens(self, text: str) -> int:
    return 1 + len(self.tok.encode(text))

  def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    if spaces := len(context) - len(context.rstrip(' ')):
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = self.tok.encode(context)
    whole = self.tok.encode(context + continuation)
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
      return ctx, whole[len(ctx):]
    return ctx, self.tok.encode(continuation)

  def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]:
    rows = []
    for context, continuation in requests:
      ctx, cont = self._pair(context, continuation)
      if not cont:
        raise ValueError(f'loglikelihood: empty continuation for context ...{context[-40:]!r}')
      ids = ([self.tok.bos_id] + ctx + cont)[-self.max_length:]
      rows.append((ids, min(len(cont), len(ids) - 1)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out = np.zeros(len(rows), np.float64)
    b = self.gen._batch_bucket(self.batch_size)
    with _progress(len(rows), 'loglikelihood') as bar, jax.set_mesh(self.gen.mesh):
      for start in range(0, len(order), self.batch_size):
        chunk = order[start:start + self.batch_size]
        t = gen_lib.bucket(len(rows[chunk[0]][0]), self.min_bucket)
        tokens = np.full((b, t), self.tok.pad_id, np.int32)
        mask = np.zeros((b, t), np.float32)
        for r, i in enumerate(chunk):
          ids, n_cont = rows[i]
          tokens[r, :len(ids)] = ids
          mask[r, len(ids) - n_cont:len(ids)] = 1.0
        out[chunk] = np.asarray(self._score(self.gen.params, tokens, mask))[:len(chunk)]
        bar.update(len(chunk))
    return [float(x) for x in out]

  def generate(self, prompts: list[str], *, max_new_tokens: int, stop: list[str],
               temperature: float = 0.0, num_samples: int = 1) -> list[list[str]]:
    budget = max(self.max_length - max_new_tokens, self.max_length // 2)
    ids = [([self.tok.bos_id] + self.tok.encode(p))[-budget:] for p in prompts]
    with _progress(len(ids) * num_samples, 'generate') as bar:
      texts = [c.text for c in self.gen.complete(
          ids, max_new_tokens=max_new_tokens, stop=stop, samples=num_samples,
          sampling=decode.Sampling(temperature=temperature), progress=bar)]
    return [texts[k * num_samples:(k + 1) * num_samples] for k in range(len(prompts))]
