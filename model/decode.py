"""Incremental decoding with a KV cache: prefill, sampling, and a jittable decoding loop.

Pure functions of a `Decoder` (no tokenizer, no checkpoints; train/generate.py wraps them).

Layout of a batch of prompts of different lengths: prompts are left-padded to a common length
P (a bucket), generated tokens follow from column P on, in a buffer of S columns (S = P + a
bucket of new tokens; the KV cache has S slots):

  column     0 .. P-1-len_b | P-len_b .. P-1 | P .. P+num_new_b-1 | ..
  token      pad            | prompt         | generated          | pad
  segment    0              | 1              | 1                  | 0
  position   0              | 0 .. len_b-1   | len_b ..           | (len_b + column - P)

All rows write the same cache slot at each step; segment 0 keeps the padding invisible and
positions count from each prompt's first real token, so a row computes exactly what it would
alone (tests check it against a full forward pass of the unpadded sequence).

Sampling (`Sampling`): greedy when temperature == 0, else softmax(logits / temperature)
restricted to the top_k tokens (0: all) and to the smallest most-likely set whose probability
reaches top_p (1.0: all). The log-probability returned with each token is the model's own,
log_softmax(logits)[token], whatever the sampling settings (RLHF's behaviour policy).

The state of a decoding run is a dict of arrays (see `start`), so a run can be advanced in
chunks between which the host checks stop strings, without recompiling anything.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.transformer import init_cache


def decoding_config(cfg: ModelConfig) -> ModelConfig:
  """`cfg` for generation: MoE 'capacity' dispatch with capacity_factor >= experts / top-k, so
  that nothing drops (a prefill of t columns could drop what one-token steps never drop, and
  the left padding would take the prompt's slots); every other config as is."""
  if cfg.is_moe and cfg.dispatch == 'capacity':
    no_drop = cfg.num_experts / cfg.experts_per_token
    if cfg.capacity_factor < no_drop:
      return dataclasses.replace(cfg, capacity_factor=float(no_drop))
  return cfg


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is drawn; hashable, so a jit can take it as a static argument."""
  temperature: float = 0.0  # 0: greedy (argmax).
  top_k: int = 0  # 0: no top-k cut.
  top_p: float = 1.0  # 1.0: no nucleus cut.

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f'sampling temperature must be >= 0, got {self.temperature}')
    if self.top_k < 0:
      raise ValueError(f'sampling top_k must be >= 0 (0 = off), got {self.top_k}')
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f'sampling top_p must be in (0, 1] (1 = off), got {self.top_p}')

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def filter_logits(logits_bv, sampling: Sampling):
  """logits / temperature with -inf outside the top-k and top-p sets (not for greedy)."""
  x_bv = logits_bv.astype(jnp.float32) / sampling.temperature
  v = x_bv.shape[-1]
  if 0 < sampling.top_k < v:
    kth_b1 = jax.lax.top_k(x_bv, sampling.top_k)[0][:, -1:]
    x_bv = jnp.where(x_bv < kth_b1, -jnp.inf, x_bv)
  if sampling.top_p < 1.0:
    sorted_bv = jnp.flip(jnp.sort(x_bv, axis=-1), axis=-1)  # Descending.
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv  # Mass of the more likely tokens.
    kept_b = jnp.sum(before_bv < sampling.top_p, axis=-1)  # >= 1: the first is always kept.
    threshold_b1 = jnp.take_along_axis(sorted_bv, kept_b[:, None] - 1, axis=-1)
    x_bv = jnp.where(x_bv < threshold_b1, -jnp.inf, x_bv)
  return x_bv


def sample_tokens(logits_bv, rng, sampling: Sampling):
  """int32 [b]: one token per row."""
  if sampling.greedy:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, filter_logits(logits_bv, sampling), axis=-1).astype(jnp.int32)


def token_logprobs(logits_bv, tokens_b):
  """float32 [b]: log_softmax(logits)[token] of the unmodified model distribution."""
  logp_bv = jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp_bv, tokens_b[:, None], axis=-1)[:, 0]


def left_pad(prompts: list, length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> (int32 [b, length] left-padded, int32 [b] lengths)."""
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  lengths = np.zeros(len(prompts), np.int32)
  for i, ids in enumerate(prompts):
    if not 0 < len(ids) <= length:
      raise ValueError(f'prompt {i} has {len(ids)} tokens; prompts need 1 to {length}')
    tokens[i, length - len(ids):] = ids
    lengths[i] = len(ids)
  return tokens, lengths


def prompt_layout(lengths_b, prompt_len: int):
  """(positions_bp, segment_ids_bp) of left-padded prompts of the given lengths."""
  pad_b1 = prompt_len - lengths_b[:, None]
  col_p = jnp.arange(prompt_len, dtype=jnp.int32)[None, :]
  positions_bp = jnp.maximum(col_p - pad_b1, 0).astype(jnp.int32)
  segment_ids_bp = (col_p >= pad_b1).astype(jnp.int32)
  return positions_bp, segment_ids_bp


def _is_eos(tokens_b, eos_ids_e):
  return jnp.any(tokens_b[:, None] == eos_ids_e[None, :], axis=-1)


def _next(logits_bv, rng, done_b, sampling: Sampling, pad_id: int):
  """(token_b, logprob_b, rng): one sampled token per row; pad_id and log-prob 0 where done."""
  rng, key = jax.random.split(rng)
  token_b = sample_tokens(logits_bv, key, sampling)
  logprob_b = jnp.where(done_b, 0.0, token_logprobs(logits_bv, token_b))
  return jnp.where(done_b, pad_id, token_b), logprob_b, rng


def start(model, tokens_bp, lengths_b, *, total_len: int, rng, sampling: Sampling, eos_ids_e,
          done_b=None, pad_id: int = 0, cache_dtype=None) -> dict:
  """Prefills the cache with the prompts and samples the first new token of every row.

  Returns the decoding state: cache (S = total_len slots), tokens_bs / logprobs_bs (the buffer
  of the module docstring; logprobs 0 outside generated tokens), lengths_b (prompt lengths),
  num_new_b (tokens generated per row, EOS included), done_b (EOS seen, or `done_b` given:
  rows that are only batch filler), step (columns generated, the same for all rows),
  prompt_len and rng.
  """
  b, p = tokens_bp.shape
  if total_len <= p:
    raise ValueError(f'model/decode.py start: total_len={total_len} leaves no room after '
                     f'prompts of {p} columns')
  positions_bp, segment_ids_bp = prompt_layout(lengths_b, p)
  cache = init_cache(model.cfg, b, total_len, cache_dtype)
  h_bpd, cache = model.extend(tokens_bp, positions_bp, segment_ids_bp, cache, 0)
  done_b = jnp.zeros((b,), bool) if done_b is None else done_b
  first_b, logprob_b, rng = _next(model.logits(h_bpd[:, -1:])[:, 0], rng, done_b, sampling, pad_id)
  tokens_bs = jnp.full((b, total_len), pad_id, jnp.int32).at[:, :p].set(tokens_bp)
  tokens_bs = tokens_bs.at[:, p].set(first_b)
  logprobs_bs = jnp.zeros((b, total_len), jnp.float32).at[:, p].set(logprob_b)
  return {'cache': cache, 'tokens_bs': tokens_bs, 'logprobs_bs': logprobs_bs,
          'lengths_b': lengths_b.astype(jnp.int32), 'num_new_b': (~done_b).astype(jnp.int32),
          'done_b': done_b | _is_eos(first_b, eos_ids_e), 'step': jnp.int32(1),
          'prompt_len': jnp.int32(p), 'rng': rng}


def advance(model, state: dict, limit, *, sampling: Sampling, eos_ids_e, pad_id: int = 0) -> dict:
  """Generates until `step == limit` (tokens per row, a traced scalar), every row is done, or
  the buffer is full. Rows already done get `pad_id` and log-prob 0."""
  total_len = state['tokens_bs'].shape[1]
  limit = jnp.minimum(limit, total_len - state['prompt_len'])

  def cond(s):
    return (s['step'] < limit) & ~jnp.all(s['done_b'])

  def body(s):
    col = s['prompt_len'] + s['step'] - 1  # The newest token, not yet in the cache.
    last_b1 = jax.lax.dynamic_slice_in_dim(s['tokens_bs'], col, 1, axis=1)
    positions_b1 = (s['lengths_b'] + s['step'] - 1)[:, None]
    h_b1d, cache = model.extend(last_b1, positions_b1, jnp.ones_like(last_b1), s['cache'], col)
    new_b, logprob_b, rng = _next(model.logits(h_b1d)[:, 0], s['rng'], s['done_b'], sampling,
                                  pad_id)
    tokens_bs = jax.lax.dynamic_update_slice_in_dim(s['tokens_bs'], new_b[:, None], col + 1, 1)
    logprobs_bs = jax.lax.dynamic_update_slice_in_dim(s['logprobs_bs'], logprob_b[:, None],
                                                      col + 1, 1)
    return {**s, 'cache': cache, 'tokens_bs': tokens_bs, 'logprobs_bs': logprobs_bs,
            'num_new_b': s['num_new_b'] + (~s['done_b']).astype(jnp.int32),
            'done_b': s['done_b'] | _is_eos(new_b, eos_ids_e), 'step': s['step'] + 1, 'rng': rng}

  return jax.lax.while_loop(cond, body, state)


def sequence_layout(tokens_bs, lengths_b, num_new_b, prompt_len: int) -> dict:
  """The buffer as one sequence per row, for a full forward pass over prompt + completion:
  tokens, positions, segment ids (0 on padding) and `response_mask` (1 on generated tokens,
  EOS included). Works on numpy or jax arrays of a finished (or partial) run."""
  xp = jnp if isinstance(tokens_bs, jax.Array) else np
  s = tokens_bs.shape[1]
  col_s = xp.arange(s)[None, :]
  pad_b1 = prompt_len - lengths_b[:, None]
  response_bs = (col_s >= prompt_len) & (col_s < prompt_len + num_new_b[:, None])
  segment_ids_bs = ((col_s >= pad_b1) & (col_s < prompt_len)) | response_bs
  positions_bs = xp.maximum(col_s - pad_b1, 0)
  return {'tokens': tokens_bs, 'positions': positions_bs.astype(xp.int32),
          'segment_ids': segment_ids_bs.astype(xp.int32),
          'response_mask': response_bs.astype(xp.float32)}
