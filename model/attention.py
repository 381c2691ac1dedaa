"""Dot-product attention behind one `implementation` switch.

All implementations share one contract: `q_btnh` has n query heads, `k_bskh` / `v_bskh` have k
kv heads (k divides n: MHA when k == n, MQA when k == 1, GQA in between; K/V are never repeated
to n heads). Logits are scaled by 1/sqrt(h); softmax statistics are float32; the output has q's
dtype. Query i may attend key j iff

    q_segment_ids[i] == kv_segment_ids[j]  and  kv_positions[j] <= q_positions[i].

Packed documents carry segment ids 1, 2, ... with positions restarting per document; padding is
segment 0. A KV cache passes absolute positions and segment 0 for its empty slots. A query row
with no allowed key returns zeros.

Implementations (IMPLEMENTATIONS):
  reference  plain einsums and an explicit [b, t, s] boolean mask; the ground truth of the tests.
  xla        `jax.nn.dot_product_attention(implementation='xla')` with the same boolean mask.
  chunked    blockwise online-softmax attention in plain JAX with a custom VJP
             (model/attention_chunked.py): memory O(t + s), never the [t, s] score matrix.
  cudnn      `jax.nn.dot_product_attention(implementation='cudnn')`, NVIDIA GPUs only.
  splash     TPU Pallas splash attention with segment ids and a causal mask, TPUs only.
  auto       `resolve()` picks one per backend and shape and logs the choice once.
"""

import logging
import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('reference', 'xla', 'chunked', 'cudnn', 'splash', 'auto')

# 'auto' on CPU switches from 'xla' (one [t, s] score matrix per head) to 'chunked' above this
# many query*key pairs: 8192 * 8192 float32 scores are 256 MiB per head, about the point where
# the materialised scores (kept again for the backward pass) stop fitting a laptop's memory.
AUTO_CHUNKED_MIN_PAIRS = 8192 * 8192

log = logging.getLogger(__name__)
_logged_choices: set = set()


def make_mask(q_segment_ids_bt, kv_segment_ids_bs, q_positions_bt, kv_positions_bs):
  """[b, t, s] boolean: same segment and key position <= query position."""
  same_bts = q_segment_ids_bt[:, :, None] == kv_segment_ids_bs[:, None, :]
  causal_bts = kv_positions_bs[:, None, :] <= q_positions_bt[:, :, None]
  return same_bts & causal_bts


def _check_inputs(q_btnh, k_bskh, v_bskh, q_segment_ids_bt, kv_segment_ids_bs, q_positions_bt,
                  kv_positions_bs):
  where = 'model/attention.py attention()'
  if q_btnh.ndim != 4 or k_bskh.ndim != 4 or v_bskh.ndim != 4:
    raise ValueError(f'{where}: q, k, v must be [b, t, n, h] / [b, s, k, h], got shapes '
                     f'{q_btnh.shape}, {k_bskh.shape}, {v_bskh.shape}')
  b, t, n, h = q_btnh.shape
  if k_bskh.shape != v_bskh.shape:
    raise ValueError(f'{where}: k and v shapes differ: {k_bskh.shape} vs {v_bskh.shape}')
  _, s, k, hk = k_bskh.shape
  if k_bskh.shape[0] != b or hk != h:
    raise ValueError(f'{where}: k {k_bskh.shape} does not match q {q_btnh.shape} in batch or head dim')
  if n % k:
    raise ValueError(f'{where}: kv heads ({k}) must divide query heads ({n})')
  for name, x, want in (('q_segment_ids_bt', q_segment_ids_bt, (b, t)),
                        ('kv_segment_ids_bs', kv_segment_ids_bs, (b, s)),
                        ('q_positions_bt', q_positions_bt, (b, t)),
                        ('kv_positions_bs', kv_positions_bs, (b, s))):
    if tuple(x.shape) != want:
      raise ValueError(f'{where}: {name} must have shape {want}, got {tuple(x.shape)}')
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f'{where}: {name} must be integer, got {x.dtype}')


def resolve(implementation: str, q_len: int, kv_len: int, *, backend: str | None = None,
            dtype=None, head_dim: int | None = None) -> str:
  """The concrete implementation that `implementation` means for these lengths.

  'auto' picks: 'cudnn' on GPU for float16/bfloat16 inputs with more than one query
  (a one-token decode step gains nothing from a fused kernel; cuDNN also needs a head dim that is
  a multiple of 8 and at most 128, or 256 from Hopper on — 128 is assumed here); 'splash' on TPU
  when the call is self-attention (q_len == kv_len) over a multiple of 128 tokens; otherwise
  'chunked' when q_len * kv_len > AUTO_CHUNKED_MIN_PAIRS and 'xla' below that. `backend`,
  `dtype` and `head_dim` default to the default backend / 'unknown' (treated as eligible).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'model/attention.py: implementation {implementation!r} is not one of '
                     f'{IMPLEMENTATIONS}')
  if implementation != 'auto':
    return implementation
  backend = backend or jax.default_backend()
  half = dtype is None or jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  head_ok = head_dim is None or (head_dim % 8 == 0 and head_dim <= 128)
  if backend in ('gpu', 'cuda') and half and head_ok and q_len > 1:
    return 'cudnn'
  if backend == 'tpu' and q_len == kv_len and q_len % 128 == 0:
    return 'splash'
  return 'chunked' if q_len * kv_len > AUTO_CHUNKED_MIN_PAIRS else 'xla'


def _reference(q_btnh, k_bskh, v_bskh, mask_bts):
  b, t, n, h = q_btnh.shape
  k = k_bskh.shape[2]
  q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
  logits_bkgts = jnp.einsum('btkgh,bskh->bkgts', q_btkgh, k_bskh,
                            preferred_element_type=jnp.float32) / math.sqrt(h)
  mask_b11ts = mask_bts[:, None, None]
  logits_bkgts = jnp.where(mask_b11ts, logits_bkgts, jnp.finfo(jnp.float32).min)
  probs_bkgts = jnp.where(mask_b11ts, jax.nn.softmax(logits_bkgts, axis=-1), 0.0)
  out_btkgh = jnp.einsum('bkgts,bskh->btkgh', probs_bkgts.astype(v_bskh.dtype), v_bskh,
                         preferred_element_type=jnp.float32)
  return out_btkgh.reshape(b, t, n, h).astype(q_btnh.dtype)


def _xla(q_btnh, k_bskh, v_bskh, mask_bts):
  out_btnh = jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask_bts[:, None],
                                          implementation='xla')
  # jax fills a row with no allowed key with the mean of v; the contract says zeros.
  return jnp.where(jnp.any(mask_bts, axis=-1)[:, :, None, None], out_btnh, 0).astype(q_btnh.dtype)


def attention(q_btnh, k_bskh, v_bskh, *, q_segment_ids_bt, kv_segment_ids_bs, q_positions_bt,
              kv_positions_bs, implementation: str = 'xla', chunk_size: int = 1024):
  """Masked (segment + position causal) multi-/grouped-query attention; returns [b, t, n, h]."""
  _check_inputs(q_btnh, k_bskh, v_bskh, q_segment_ids_bt, kv_segment_ids_bs, q_positions_bt,
                kv_positions_bs)
  _, t, _, h = q_btnh.shape
  s = k_bskh.shape[1]
  impl = resolve(implementation, t, s, dtype=q_btnh.dtype, head_dim=h)
  if implementation == 'auto':
    key = (jax.default_backend(), q_btnh.shape, k_bskh.shape, str(q_btnh.dtype), impl)
    if key not in _logged_choices:
      _logged_choices.add(key)
      log.info('attention auto -> %s (backend %s, q %s, kv %s, %s)', impl, key[0], key[1], key[2],
               key[3])
  segs = (q_segment_ids_bt, kv_segment_ids_bs, q_positions_bt, kv_positions_bs)
  if impl == 'reference':
    return _reference(q_btnh, k_bskh, v_bskh, make_mask(*segs))
  if impl == 'xla':
    return _xla(q_btnh, k_bskh, v_bskh, make_mask(*segs))
  raise NotImplementedError(f'model/attention.py: implementation {impl!r} not available yet')
