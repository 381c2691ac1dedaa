"""Decoding with a KV cache: pure functions of a `Decoder` (train/generate.py wraps them).

Continuous batching (`start`, `run`) in one jitted loop: one cache row of S = P + N columns per
decode slot (P, N: buckets of prompt and new lengths); before each one-token step of all slots,
queued prompts are prefilled into the free slots. A row:

  column     0 .. P-1-len | P-len .. P-1 | P .. P+num_new-1 | ..
  token      pad          | prompt       | generated        | empty
  segment    0            | 1            | 1                | 0
  position   0            | 0 .. len-1   | len ..           |

Each slot writes its next token at its own column P + num_new - 1; segment 0 hides padding and
empty slots and positions count from the prompt's first token, so a sequence computes what it
would alone. Admission resets the whole row. Token i of a sequence draws with the run's key
folded with (sequence id, i). With g samples per prompt, sequences g*j .. g*j+g-1 share prompt
j: prefilled once, its cache row copied into g slots (a group is admitted whole).

Sampling: greedy when temperature == 0, else softmax(logits / temperature) restricted to the
top_k tokens (0: all) and the smallest most likely set reaching top_p (1.0: all). The returned
log-probability is the model's own, log_softmax(logits)[token], whatever the settings.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.sharding import constrain
from model.transformer import CACHE_AXES, init_cache


def decoding_config(cfg: ModelConfig) -> ModelConfig:
  """`cfg` for generation: MoE 'capacity' dispatch gets capacity_factor >= experts / top-k (a
  prefill drops nothing; one-token steps never do); other configs as they are."""
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
  if sampling.temperature == 0.0:  # Greedy.
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, filter_logits(logits_bv, sampling), axis=-1).astype(jnp.int32)


def token_logprobs(logits_bv, tokens_b):
  """float32 [b]: log_softmax(logits)[token] of the unmodified model distribution."""
  logp_bv = jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp_bv, tokens_b[:, None], axis=-1)[:, 0]


def left_pad(prompts: list, length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> (int32 [b, length] left-padded, int32 [b] lengths)."""
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  for i, ids in enumerate(prompts):
    if not 0 < len(ids) <= length:
      raise ValueError(f'prompt {i} has {len(ids)} tokens; prompts need 1 to {length}')
    tokens[i, length - len(ids):] = ids
  return tokens, np.asarray([len(ids) for ids in prompts], np.int32)


def prompt_layout(lengths_b, prompt_len: int):
  """(positions_bp, segment_ids_bp) of left-padded prompts of the given lengths."""
  pad_b1 = prompt_len - lengths_b[:, None]
  col_p = jnp.arange(prompt_len, dtype=jnp.int32)[None, :]
  positions_bp = jnp.maximum(col_p - pad_b1, 0).astype(jnp.int32)
  segment_ids_bp = (col_p >= pad_b1).astype(jnp.int32)
  return positions_bp, segment_ids_bp


def _is_eos(tokens_b, eos_ids_e):
  return jnp.any(tokens_b[:, None] == eos_ids_e[None, :], axis=-1)


def start(cfg: ModelConfig, slots: int, tokens_mp, lengths_m, new_len: int, samples: int = 1,
          cache_dtype=None) -> dict:
  """State for m prompts (left-padded to P), n = m x `samples` sequences (i samples prompt
  i // samples), `slots` free slots: the prompts, `queued` (sequences admitted), a cache of P +
  new_len columns; per slot seq_b, lengths_b, num_new_b (tokens made, EOS included), done_b
  (finished or free); per sequence tokens_nn, logprobs_nn (0 past its end), num_new_n."""
  n = tokens_mp.shape[0] * samples
  zeros_b = jnp.zeros((slots,), jnp.int32)
  return {'cache': init_cache(cfg, slots, tokens_mp.shape[1] + new_len, cache_dtype),
          'prompts_mp': tokens_mp, 'lengths_m': lengths_m, 'queued': jnp.int32(0),
          'seq_b': zeros_b, 'lengths_b': zeros_b, 'num_new_b': zeros_b,
          'done_b': jnp.ones((slots,), bool), 'tokens_nn': jnp.zeros((n, new_len), jnp.int32),
          'num_new_n': jnp.zeros((n,), jnp.int32),
          'logprobs_nn': jnp.zeros((n, new_len), jnp.float32)}


def _group(s: dict) -> int:
  """Samples per prompt of a decoding state."""
  return s['tokens_nn'].shape[0] // s['prompts_mp'].shape[0]


def _draw(logits_bv, rng, seq_b, index_b, sampling: Sampling):
  """(token, log-prob) per row; row b's key is rng folded with (seq_b[b], index_b[b]) only."""
  keys_b = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.fold_in(rng, s), i))(seq_b, index_b)
  tokens_b = jax.vmap(lambda x_v, k: sample_tokens(x_v[None], k, sampling)[0])(logits_bv, keys_b)
  return tokens_b, token_logprobs(logits_bv, tokens_b)


def _admit(model, s: dict, rows: int, num, max_new, rng, sampling: Sampling, eos_ids_e) -> dict:
  """Prefills the next `rows` queued sequences (a multiple of the group; fewer if fewer are
  left) into the first free slots, once per prompt, and samples each one's first token."""
  slots, (m, p), g = s['done_b'].shape[0], s['prompts_mp'].shape, _group(s)
  n = m * g
  seq_k = s['queued'] + jnp.arange(rows, dtype=jnp.int32)
  slot_k = jnp.nonzero(s['done_b'], size=rows, fill_value=slots)[0]
  slot_k, out_k = jnp.where(seq_k < num, slot_k, slots), jnp.where(seq_k < num, seq_k, n)
  read_j = jnp.minimum(seq_k[::g] // g, m - 1)  # Rows past the queue are filler: written nowhere.
  positions_jp, segment_ids_jp = prompt_layout(s['lengths_m'][read_j], p)
  cache = init_cache(model.cfg, rows // g, s['cache']['segment_ids'].shape[1],
                     s['cache']['k'].dtype)
  h_jpd, cache = model.extend(s['prompts_mp'][read_j], positions_jp, segment_ids_jp, cache, 0)
  logits_kv = jnp.repeat(model.logits(h_jpd[:, -1:])[:, 0], g, axis=0)
  first_k, logprob_k = _draw(logits_kv, rng, seq_k, jnp.zeros_like(seq_k), sampling)
  batch_axis = {'k': 2, 'v': 2, 'segment_ids': 0, 'positions': 0}
  cache = {name: x.at[(slice(None),) * batch_axis[name] + (slot_k,)].set(
               jnp.repeat(cache[name], g, axis=batch_axis[name]), mode='drop')
           for name, x in s['cache'].items()}
  cache['k'], cache['v'] = constrain(cache['k'], CACHE_AXES), constrain(cache['v'], CACHE_AXES)
  put = lambda name, index, new: s[name].at[index].set(new, mode='drop')
  return {**s, 'cache': cache, 'queued': jnp.minimum(s['queued'] + rows, num),
          'seq_b': put('seq_b', slot_k, seq_k),
          'lengths_b': put('lengths_b', slot_k, s['lengths_m'][seq_k // g]),
          'num_new_b': put('num_new_b', slot_k, 1),
          'done_b': put('done_b', slot_k, _is_eos(first_k, eos_ids_e) | (max_new <= 1)),
          'tokens_nn': put('tokens_nn', (out_k, 0), first_k),
          'logprobs_nn': put('logprobs_nn', (out_k, 0), logprob_k),
          'num_new_n': put('num_new_n', out_k, 1)}


def _step(model, s: dict, max_new, rng, sampling: Sampling, eos_ids_e) -> dict:
  """One token for every slot; done (or free) slots are computed too and change nothing."""
  n, new_len = s['tokens_nn'].shape
  p = s['cache']['segment_ids'].shape[1] - new_len
  n_b, live_b = s['num_new_b'], ~s['done_b']
  last_b1 = s['tokens_nn'][s['seq_b'], jnp.maximum(n_b - 1, 0)][:, None]
  h_b1d, cache = model.extend(last_b1, (s['lengths_b'] + n_b - 1)[:, None],
                              jnp.ones_like(last_b1), s['cache'], p + n_b - 1)
  new_b, logprob_b = _draw(model.logits(h_b1d)[:, 0], rng, s['seq_b'], n_b, sampling)
  out_b = jnp.where(live_b, s['seq_b'], n)  # Done slots write nothing.
  num_new_b = n_b + live_b
  return {**s, 'cache': cache, 'num_new_b': num_new_b,
          'done_b': s['done_b'] | _is_eos(new_b, eos_ids_e) | (num_new_b >= max_new),
          'tokens_nn': s['tokens_nn'].at[out_b, n_b].set(new_b, mode='drop'),
          'logprobs_nn': s['logprobs_nn'].at[out_b, n_b].set(logprob_b, mode='drop'),
          'num_new_n': s['num_new_n'].at[out_b].set(num_new_b, mode='drop')}


def run(model, state: dict, steps, num, max_new, *, rows: int, static: bool, rng,
        sampling: Sampling, eos_ids_e) -> dict:
  """Continuous batching of `state`'s first `num` sequences for up to `steps` steps or until all are
  done (EOS or `max_new` tokens); before each step queued ones are admitted `rows` at a time (whole
  groups, >= 1) while slots are free (`static`: all). Needs slots >= samples per prompt."""
  slots, g = state['done_b'].shape[0], _group(state)
  rows = slots // g * g if static else max(1, rows // g) * g

  def admissible(s):
    left = num - s['queued']
    return (left > 0) & (jnp.sum(s['done_b']) >= (slots if static else jnp.minimum(rows, left)))

  def body(carry):
    i, s = carry
    s = jax.lax.while_loop(admissible, lambda s: _admit(model, s, rows, num, max_new, rng,
                                                        sampling, eos_ids_e), s)
    return i + 1, _step(model, s, max_new, rng, sampling, eos_ids_e)

  def cond(carry):
    i, s = carry
    return (i < steps) & ((s['queued'] < num) | ~jnp.all(s['done_b']))

  return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]


def sequence_layout(tokens_bs, lengths_b, num_new_b, prompt_len: int) -> dict:
  """The buffer (numpy or jax) as one sequence per row for a forward pass: tokens, positions,
  segment ids (0 on padding), `response_mask` (1 on generated tokens, EOS included)."""
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
