"""Dot-product attention behind one `implementation` switch.

One contract for all: `q_btnh` has n query heads, `k_bskh` / `v_bskh` k kv heads (k divides n:
MHA, GQA or MQA; K/V are never repeated to n heads). Logits are scaled by 1/sqrt(h), softmax
statistics are float32, the output has q's dtype. Query i may attend key j iff

    q_segment_ids[i] == kv_segment_ids[j]  and  kv_positions[j] <= q_positions[i].

Packed documents carry segment ids 1, 2, ..., positions restarting per document, padding segment
0; a KV cache passes absolute positions and segment 0 for empty slots. A row with no allowed key
returns zeros.

Implementations (IMPLEMENTATIONS):
  reference  plain einsums and an explicit [b, t, s] boolean mask; the tests' ground truth.
  xla        one [t, s] score matrix per head, backward pass written out (GEMM-friendly layouts).
  chunked    blockwise online softmax with a flash-attention custom VJP: memory O(t + s) plus
             one block; block pairs with no allowed pair are skipped (lax.cond).
  cudnn      `jax.nn.dot_product_attention(implementation='cudnn')`, NVIDIA GPUs only.
  splash     TPU Pallas splash attention, in `shard_map` over batch and heads (whole sequences).
  auto       `resolve()` picks one per platform and shape and logs the choice once.
The platform is the mesh's (`model.sharding.mesh_platform`; abstract devices too, train/aot.py).
"""

import logging
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from model.config import ATTENTION_IMPLS as IMPLEMENTATIONS
from model.sharding import logical_to_spec, mesh_platform

# 'auto' without a fused kernel: 'chunked' from this many query * key pairs on, else 'xla'.
AUTO_CHUNKED_MIN_PAIRS = 4096 * 4096

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # Finite "minus infinity": no inf - inf.

log = logging.getLogger(__name__)
_logged_choices: set = set()


def make_mask(q_segment_ids_bt, kv_segment_ids_bs, q_positions_bt, kv_positions_bs):
  """[b, t, s] boolean: same segment and key position <= query position."""
  same_bts = q_segment_ids_bt[:, :, None] == kv_segment_ids_bs[:, None, :]
  causal_bts = kv_positions_bs[:, None, :] <= q_positions_bt[:, :, None]
  return same_bts & causal_bts


def _check_inputs(q_btnh, k_bskh, v_bskh, segs):
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
  names = ('q_segment_ids_bt', 'kv_segment_ids_bs', 'q_positions_bt', 'kv_positions_bs')
  for name, x, want in zip(names, segs, ((b, t), (b, s)) * 2):
    if tuple(x.shape) != want:
      raise ValueError(f'{where}: {name} must have shape {want}, got {tuple(x.shape)}')
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f'{where}: {name} must be integer, got {x.dtype}')


def resolve(implementation: str, q_len: int, kv_len: int, *, backend: str | None = None,
            dtype=None, head_dim: int | None = None) -> str:
  """The concrete implementation. 'auto': 'cudnn' on GPU for 16-bit floats, q_len > 1 and a head
  dim in 8, 16, ..., 128; 'splash' on TPU for self-attention over a multiple of 128 tokens; else
  'chunked' from AUTO_CHUNKED_MIN_PAIRS query * key pairs on, 'xla' below. `backend` defaults
  to the mesh's platform; unknown dtype / head_dim qualify."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'model/attention.py: implementation {implementation!r} is not one of '
                     f'{IMPLEMENTATIONS}')
  if implementation != 'auto':
    return implementation
  backend = backend or mesh_platform()
  half = dtype is None or jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  head_ok = head_dim is None or (head_dim % 8 == 0 and head_dim <= 128)
  if backend in ('gpu', 'cuda') and half and head_ok and q_len > 1:
    return 'cudnn'
  if backend == 'tpu' and q_len == kv_len and q_len % 128 == 0:
    return 'splash'
  return 'chunked' if q_len * kv_len >= AUTO_CHUNKED_MIN_PAIRS else 'xla'


def _reference(q_btnh, k_bskh, v_bskh, mask_bts):
  (b, t, n, h), k = q_btnh.shape, k_bskh.shape[2]
  q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
  logits_bkgts = jnp.einsum('btkgh,bskh->bkgts', q_btkgh, k_bskh,
                            preferred_element_type=jnp.float32) / math.sqrt(h)
  mask_b11ts = mask_bts[:, None, None]
  logits_bkgts = jnp.where(mask_b11ts, logits_bkgts, jnp.finfo(jnp.float32).min)
  probs_bkgts = jnp.where(mask_b11ts, jax.nn.softmax(logits_bkgts, axis=-1), 0.0)
  out_btkgh = jnp.einsum('bkgts,bskh->btkgh', probs_bkgts.astype(v_bskh.dtype), v_bskh,
                         preferred_element_type=jnp.float32)
  return out_btkgh.reshape(b, t, n, h).astype(q_btnh.dtype)


# xla: queries regrouped per kv head as [b, k, m, h], m = (t, g) merged (g = n / k): every matmul
# is one batched GEMM over (b, k); dK and dV are computed transposed. Reverse mode only.
@jax.custom_vjp
def _grouped_attention(*args):  # (q_bkmh, k_bksh, v_bksh, mask_bt1s).
  return _grouped_fwd(*args)[0]


def _grouped_fwd(q_bkmh, k_bksh, v_bksh, mask_bt1s):
  """p: softmax over keys of q.k / sqrt(h) in float32, rows with no allowed key 0; out p.v."""
  b, k, m, h = q_bkmh.shape
  t = mask_bt1s.shape[1]
  logits_bktgs = jnp.einsum('bkmh,bksh->bkms', q_bkmh, k_bksh,
                            preferred_element_type=jnp.float32).reshape(b, k, t, m // t, -1)
  mask_b1t1s = mask_bt1s[:, None]
  logits_bktgs = jnp.where(mask_b1t1s, logits_bktgs * (1.0 / math.sqrt(h)), _NEG)
  max_bktg1 = jnp.max(logits_bktgs, axis=-1, keepdims=True)
  exp_bktgs = jnp.where(mask_b1t1s, jnp.exp(logits_bktgs - max_bktg1), 0.0)
  sum_bktg1 = jnp.sum(exp_bktgs, axis=-1, keepdims=True)
  p_bktgs = (exp_bktgs / jnp.where(sum_bktg1 > 0, sum_bktg1, 1.0)).astype(v_bksh.dtype)
  p_bkms = p_bktgs.reshape(b, k, m, -1)
  o_bkmh = jnp.einsum('bkms,bksh->bkmh', p_bkms, v_bksh,
                      preferred_element_type=jnp.float32).astype(q_bkmh.dtype)
  return o_bkmh, (q_bkmh, k_bksh, v_bksh, o_bkmh, p_bkms)


def _grouped_bwd(residuals, do_bkmh):
  q_bkmh, k_bksh, v_bksh, o_bkmh, p_bkms = residuals
  scale = 1.0 / math.sqrt(q_bkmh.shape[-1])
  dp_bkms = jnp.einsum('bkmh,bksh->bkms', do_bkmh, v_bksh, preferred_element_type=jnp.float32)
  # d logits = p * (dp - sum_s p * dp), and sum_s p * dp = sum_h do * o (a [b, k, m] reduction).
  rowdot_bkm1 = jnp.sum(do_bkmh.astype(jnp.float32) * o_bkmh.astype(jnp.float32), axis=-1,
                        keepdims=True)
  ds_bkms = (p_bkms.astype(jnp.float32) * (dp_bkms - rowdot_bkm1) * scale).astype(q_bkmh.dtype)
  dq_bkmh = jnp.einsum('bkms,bksh->bkmh', ds_bkms, k_bksh)
  dk_bksh = jnp.swapaxes(jnp.einsum('bkmh,bkms->bkhs', q_bkmh, ds_bkms), 2, 3)
  dv_bksh = jnp.swapaxes(jnp.einsum('bkmh,bkms->bkhs', do_bkmh, p_bkms.astype(do_bkmh.dtype)), 2, 3)
  return dq_bkmh, dk_bksh, dv_bksh, None


_grouped_attention.defvjp(_grouped_fwd, _grouped_bwd)


def _xla(q_btnh, k_bskh, v_bskh, mask_bts):
  (b, t, n, h), k = q_btnh.shape, k_bskh.shape[2]
  q_bkmh = q_btnh.reshape(b, t, k, n // k, h).transpose(0, 2, 1, 3, 4).reshape(b, k, -1, h)
  o_bkmh = _grouped_attention(q_bkmh, jnp.swapaxes(k_bskh, 1, 2), jnp.swapaxes(v_bskh, 1, 2),
                              mask_bts[:, :, None, :])
  return o_bkmh.reshape(b, k, t, n // k, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)


# chunked: q-side arrays are [nq, b, c, ...] (c query rows per block), kv-side [nk, b, r, ...]
# (r keys per block); scores of one block pair are [b, k, g, c, r] (g = n / k).
def _block_mask(qseg_bc, qpos_bc, kseg_br, kpos_br, kvalid_br):
  """[b, 1, 1, c, r] boolean mask of one (query block, key block) pair."""
  return (make_mask(qseg_bc, kseg_br, qpos_bc, kpos_br) & kvalid_br[:, None, :])[:, None, None]


def _block_logits(q_bckgh, k_brkh, scale):
  return jnp.einsum('bckgh,brkh->bkgcr', q_bckgh, k_brkh,
                    preferred_element_type=jnp.float32) * scale


@jax.custom_vjp
def _flash(*args):  # Arguments of _flash_fwd.
  return _flash_fwd(*args)[0]


def _flash_fwd(*args):
  """(blocked output [nq, b, c, k, g, h], residuals: the arguments, the output, log-sum-exp
  [nq, b, k, g, c], 0 for empty rows). The barrier ties segment ids and positions to q, k, v:
  else the layer scan hoists every block pair's mask out of its loop."""
  q_qbckgh, k_kbrkh, v_kbrkh, qseg_qbc, qpos_qbc, kseg_kbr, kpos_kbr, kvalid_kbr = (
      jax.lax.optimization_barrier(args))
  scale = 1.0 / math.sqrt(q_qbckgh.shape[-1])

  def one_q_block(args):
    q_bckgh, qseg_bc, qpos_bc = args
    b, c, k, g, h = q_bckgh.shape

    def update(carry, kv, mask):
      m_bkgc, l_bkgc, acc_bkgch = carry
      k_brkh, v_brkh = kv[:2]
      logits_bkgcr = jnp.where(mask, _block_logits(q_bckgh, k_brkh, scale), _NEG)
      m_new_bkgc = jnp.maximum(m_bkgc, logits_bkgcr.max(axis=-1))
      p_bkgcr = jnp.where(mask, jnp.exp(logits_bkgcr - m_new_bkgc[..., None]), 0.0)
      correction_bkgc = jnp.exp(m_bkgc - m_new_bkgc)
      l_bkgc = l_bkgc * correction_bkgc + p_bkgcr.sum(axis=-1)
      pv_bkgch = jnp.einsum('bkgcr,brkh->bkgch', p_bkgcr.astype(v_brkh.dtype), v_brkh,
                            preferred_element_type=jnp.float32)
      return m_new_bkgc, l_bkgc, acc_bkgch * correction_bkgc[..., None] + pv_bkgch

    def step(carry, kv):
      mask = _block_mask(qseg_bc, qpos_bc, *kv[2:])
      # Blocks with no allowed pair (the future half under a causal mask) are skipped.
      return jax.lax.cond(jnp.any(mask), update, lambda carry, *_: carry, carry, kv, mask), None

    init = (jnp.full((b, k, g, c), _NEG, jnp.float32), jnp.zeros((b, k, g, c), jnp.float32),
            jnp.zeros((b, k, g, c, h), jnp.float32))
    (m_bkgc, l_bkgc, acc_bkgch), _ = jax.lax.scan(
        step, init, (k_kbrkh, v_kbrkh, kseg_kbr, kpos_kbr, kvalid_kbr))
    nonempty_bkgc = l_bkgc > 0
    out_bkgch = acc_bkgch / jnp.where(nonempty_bkgc, l_bkgc, 1.0)[..., None]
    lse_bkgc = jnp.where(nonempty_bkgc, m_bkgc + jnp.log(jnp.where(nonempty_bkgc, l_bkgc, 1.0)), 0.0)
    return out_bkgch.transpose(0, 3, 1, 2, 4).astype(q_bckgh.dtype), lse_bkgc

  out_qbckgh, lse_qbkgc = jax.lax.map(one_q_block, (q_qbckgh, qseg_qbc, qpos_qbc))
  return out_qbckgh, (args, out_qbckgh, lse_qbkgc)


def _flash_bwd(residuals, dout_qbckgh):
  """FlashAttention-2 backward: outer scan over key blocks, inner scan over query blocks."""
  (q_qbckgh, k_kbrkh, v_kbrkh, qseg_qbc, qpos_qbc, kseg_kbr, kpos_kbr, kvalid_kbr), out_qbckgh, \
      lse_qbkgc = residuals
  scale = 1.0 / math.sqrt(q_qbckgh.shape[-1])
  dout_qbckgh = dout_qbckgh.astype(q_qbckgh.dtype)
  # delta = rowsum(dO * O), the softmax-backward correction term, laid out like lse.
  delta_qbkgc = jnp.einsum('qbckgh,qbckgh->qbkgc', dout_qbckgh.astype(jnp.float32),
                           out_qbckgh.astype(jnp.float32))

  def one_kv_block(dq_qbckgh, kv):
    k_brkh, v_brkh, kseg_br, kpos_br, kvalid_br = kv

    def update(carry, qs, mask):
      dk_brkh, dv_brkh = carry
      q_bckgh, do_bckgh, lse_bkgc, delta_bkgc = qs[:4]
      logits_bkgcr = _block_logits(q_bckgh, k_brkh, scale)
      p_bkgcr = jnp.where(mask, jnp.exp(logits_bkgcr - lse_bkgc[..., None]), 0.0)
      dv_brkh += jnp.einsum('bkgcr,bckgh->brkh', p_bkgcr.astype(do_bckgh.dtype), do_bckgh,
                            preferred_element_type=jnp.float32)
      dp_bkgcr = jnp.einsum('bckgh,brkh->bkgcr', do_bckgh, v_brkh,
                            preferred_element_type=jnp.float32)
      ds_bkgcr = (p_bkgcr * (dp_bkgcr - delta_bkgc[..., None]) * scale).astype(q_bckgh.dtype)
      dq_bckgh = jnp.einsum('bkgcr,brkh->bckgh', ds_bkgcr, k_brkh,
                            preferred_element_type=jnp.float32)
      dk_brkh += jnp.einsum('bkgcr,bckgh->brkh', ds_bkgcr, q_bckgh,
                            preferred_element_type=jnp.float32)
      return (dk_brkh, dv_brkh), dq_bckgh

    def step(carry, qs):
      mask = _block_mask(*qs[4:], kseg_br, kpos_br, kvalid_br)
      skip = lambda carry, qs, _: (carry, jnp.zeros(qs[0].shape, jnp.float32))
      return jax.lax.cond(jnp.any(mask), update, skip, carry, qs, mask)

    zeros_brkh = jnp.zeros(k_brkh.shape, jnp.float32)
    (dk_brkh, dv_brkh), dq_part_qbckgh = jax.lax.scan(
        step, (zeros_brkh, zeros_brkh),
        (q_qbckgh, dout_qbckgh, lse_qbkgc, delta_qbkgc, qseg_qbc, qpos_qbc))
    return dq_qbckgh + dq_part_qbckgh, (dk_brkh, dv_brkh)

  dq_qbckgh, (dk_kbrkh, dv_kbrkh) = jax.lax.scan(
      one_kv_block, jnp.zeros(q_qbckgh.shape, jnp.float32),
      (k_kbrkh, v_kbrkh, kseg_kbr, kpos_kbr, kvalid_kbr))
  return (dq_qbckgh.astype(q_qbckgh.dtype), dk_kbrkh.astype(k_kbrkh.dtype),
          dv_kbrkh.astype(v_kbrkh.dtype), None, None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _to_blocks(x, block):
  """[b, l, ...] -> [ceil(l / block), b, block, ...], padding the tail with zeros (False)."""
  x = jnp.pad(x, [(0, 0), (0, -x.shape[1] % block)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape(x.shape[0], -1, block, *x.shape[2:]), 1, 0)


def _chunked(q_btnh, k_bskh, v_bskh, q_segment_ids_bt, kv_segment_ids_bs, q_positions_bt,
             kv_positions_bs, chunk_size):
  if chunk_size < 1:
    raise ValueError(f'model/attention.py: chunk_size must be positive, got {chunk_size}')
  b, t, n, h = q_btnh.shape
  s, k = k_bskh.shape[1:3]
  c, r = min(chunk_size, t), min(chunk_size, s)
  q_qbckgh = _to_blocks(q_btnh.reshape(b, t, k, n // k, h), c)
  kvalid_kbr = _to_blocks(jnp.ones((b, s), bool), r)  # Padded keys are never attended.
  out_qbckgh = _flash(q_qbckgh, _to_blocks(k_bskh, r), _to_blocks(v_bskh, r),
                      _to_blocks(q_segment_ids_bt, c), _to_blocks(q_positions_bt, c),
                      _to_blocks(kv_segment_ids_bs, r), _to_blocks(kv_positions_bs, r), kvalid_kbr)
  out_btkgh = jnp.moveaxis(out_qbckgh, 0, 1).reshape(b, -1, k, n // k, h)[:, :t]
  return out_btkgh.reshape(b, t, n, h)


def _cudnn(q_btnh, k_bskh, v_bskh, mask_bts):
  """cuDNN fused attention with the segment/position rule as a boolean [b, 1, t, s] `mask`
  (exact for any packing, unlike its index-based is_causal and seq_lengths)."""
  backend = mesh_platform()
  platform_version = (getattr(jax.devices()[0].client, 'platform_version', '').lower()
                      if backend == jax.default_backend() else '')
  if backend not in ('gpu', 'cuda') or 'rocm' in platform_version:
    raise RuntimeError(
        f"model/attention.py: implementation 'cudnn' needs an NVIDIA GPU with cuDNN, but the target "
        f"backend is {backend!r} ({platform_version or 'no platform version'}); use 'xla', "
        f"'chunked' or 'auto' instead.")
  if q_btnh.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"model/attention.py: implementation 'cudnn' needs bfloat16 or float16 "
                     f"inputs, got {q_btnh.dtype}; set model.compute_dtype='bfloat16' or use "
                     f"'xla' / 'chunked'.")
  out_btnh = jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask_bts[:, None],
                                          implementation='cudnn')
  return jnp.where(jnp.any(mask_bts, axis=-1)[:, :, None, None], out_btnh, 0).astype(q_btnh.dtype)


def _splash(q_btnh, k_bskh, v_bskh, q_segment_ids_bt, kv_segment_ids_bs, *, interpret=False):
  """Splash: segment ids plus an index-causal mask (the position rule for packed self-attention;
  t != s is refused). `interpret`: the Pallas interpreter. Under a mesh, `jax.shard_map` over
  batch rows and whole GQA head groups (no sequence split)."""
  platform = mesh_platform()
  if not interpret and platform != 'tpu':
    raise RuntimeError(f"model/attention.py: implementation 'splash' needs a TPU, but the target "
                       f"backend is {platform!r} (the mesh's platform); use 'xla', 'chunked' or "
                       f"'auto'.")
  t, s = q_btnh.shape[1], k_bskh.shape[1]
  if t != s or t % 128:
    raise ValueError(f"model/attention.py: implementation 'splash' needs self-attention over a "
                     f"multiple of 128 tokens (q_len == kv_len), got q_len={t}, kv_len={s}.")
  local = lambda *args: _splash_local(*args, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return local(q_btnh, k_bskh, v_bskh, q_segment_ids_bt, kv_segment_ids_bs)
  q_spec = logical_to_spec(('batch', 'length', 'act_heads', None), q_btnh.shape, mesh)
  kv_spec = logical_to_spec(('batch', 'length', 'act_kv_heads', None), k_bskh.shape, mesh)
  if q_spec[1] is not None:
    raise ValueError(f"model/attention.py: implementation 'splash' needs whole sequences per "
                     f"device, but the sequence is split over {q_spec[1]!r} "
                     f"(sharding_rules.length); use 'chunked' or 'xla' with sequence sharding.")
  heads = q_spec[2] if q_spec[2] == kv_spec[2] else None  # Whole GQA groups per device.
  spec, seg_spec = P(q_spec[0], None, heads, None), P(q_spec[0], None)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, seg_spec, seg_spec),
                       out_specs=spec, check_vma=False)(
                           q_btnh, k_bskh, v_bskh, q_segment_ids_bt, kv_segment_ids_bs)


def _splash_local(q_btnh, k_bskh, v_bskh, q_segment_ids_bt, kv_segment_ids_bs, *, interpret):
  """Splash on the rows and heads at hand: MHA kernel when k == n, else MQA per kv head."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # Pallas TPU import: only when used.
  b, t, n, h = q_btnh.shape
  s, k = k_bskh.shape[1:3]
  g, scale = n // k, 1.0 / math.sqrt(h)
  segment_ids = splash.SegmentIds(q=q_segment_ids_bt.astype(jnp.int32),
                                  kv=kv_segment_ids_bs.astype(jnp.int32))
  q_bknth = (q_btnh * jnp.asarray(scale, q_btnh.dtype)).reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4)
  k_bksh, v_bksh = k_bskh.transpose(0, 2, 1, 3), v_bskh.transpose(0, 2, 1, 3)
  if g == 1:  # MHA: one kernel over all heads.
    kernel = splash.make_splash_mha_single_device(
        splash.MultiHeadMask([splash.CausalMask((t, s))] * n), interpret=interpret)
    out_bkgth = jax.vmap(kernel)(q_bknth[:, :, 0], k_bksh, v_bksh, segment_ids)[:, :, None]
  else:  # GQA / MQA: a shared-kv kernel per kv head, g query heads each.
    kernel = splash.make_splash_mqa_single_device(
        splash.MultiHeadMask([splash.CausalMask((t, s))] * g), interpret=interpret)
    per_kv_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))
    out_bkgth = jax.vmap(per_kv_head)(q_bknth, k_bksh, v_bksh, segment_ids)
  return out_bkgth.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q_btnh.dtype)


def attention(q_btnh, k_bskh, v_bskh, *, q_segment_ids_bt, kv_segment_ids_bs, q_positions_bt,
              kv_positions_bs, implementation: str = 'xla', chunk_size: int = 1024):
  """Masked (segment + position causal) multi-/grouped-query attention; returns [b, t, n, h]."""
  segs = (q_segment_ids_bt, kv_segment_ids_bs, q_positions_bt, kv_positions_bs)
  _check_inputs(q_btnh, k_bskh, v_bskh, segs)
  impl = resolve(implementation, q_btnh.shape[1], k_bskh.shape[1], dtype=q_btnh.dtype,
                 head_dim=q_btnh.shape[3])
  key = (mesh_platform(), q_btnh.shape, k_bskh.shape, str(q_btnh.dtype), impl)
  if implementation == 'auto' and key not in _logged_choices:
    _logged_choices.add(key)
    log.info('attention auto -> %s (backend %s, q %s, kv %s, %s)', impl, *key[:4])
  if impl == 'chunked':
    return _chunked(q_btnh, k_bskh, v_bskh, *segs, chunk_size)
  if impl == 'splash':
    return _splash(q_btnh, k_bskh, v_bskh, q_segment_ids_bt, kv_segment_ids_bs)
  return {'reference': _reference, 'xla': _xla, 'cudnn': _cudnn}[impl](
      q_btnh, k_bskh, v_bskh, make_mask(*segs))
