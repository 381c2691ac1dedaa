"""Output head and next-token loss fused and chunked: sum of masked NLL without [b, t, vocab].

The custom VJP's forward walks each device's tokens in chunks of <= CHUNK_TOKENS: logits,
logsumexp, d logits = softmax - onehot, accumulating dW and dh; the backward only scales them
by the cotangent (no differentiation: the loss only). Inside `jax.shard_map` the head matrix is
gathered over FSDP, its vocabulary may stay split (pmax/psum combine logsumexp and the target
logit), and dW is summed over the token shards once per call (benchmarks/results/dense_cpu.md).
"""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from model.sharding import logical_to_spec, spec_axes

CHUNK_TOKENS = 1024  # Tokens per chunk per device: [1024, vocab] float32 logits at a time.


def chunk_len(b: int, t: int) -> int:
  """Largest divisor c of t with b * c <= CHUNK_TOKENS (at least 1)."""
  return max((c for c in range(1, t + 1) if t % c == 0 and b * c <= CHUNK_TOKENS), default=1)


def _local(h_btd, w_dv, targets_bt, mask_bt, *, vocab_axes, token_axes, grads: bool):
  """Per device: (nll_sum, dh_btd, dw_dv) of sum(mask * nll) (gradients only if `grads`)."""
  b, t, d = h_btd.shape
  offset = jax.lax.axis_index(vocab_axes) * w_dv.shape[1] if vocab_axes else 0
  c = chunk_len(b, t)
  split = lambda x: jnp.swapaxes(x.reshape((b, t // c, c) + x.shape[2:]), 0, 1)
  xs = (split(h_btd), split(targets_bt), split(mask_bt.astype(jnp.float32)))

  def chunk(h_bcd, tgt_bc, m_bc):
    l_bcv = jnp.einsum('bcd,dv->bcv', h_bcd, w_dv).astype(jnp.float32)
    mx_bc = jnp.max(l_bcv, axis=-1)
    if vocab_axes:
      mx_bc = jax.lax.pmax(mx_bc, vocab_axes)
    sum_bc = jnp.sum(jnp.exp(l_bcv - mx_bc[..., None]), axis=-1)
    local_t_bc = tgt_bc - offset
    onehot_bcv = (jax.lax.broadcasted_iota(jnp.int32, l_bcv.shape, 2) == local_t_bc[..., None])
    tl_bc = jnp.sum(jnp.where(onehot_bcv, l_bcv, 0.0), axis=-1)
    if vocab_axes:
      sum_bc, tl_bc = jax.lax.psum((sum_bc, tl_bc), vocab_axes)
    lse_bc = mx_bc + jnp.log(sum_bc)
    return l_bcv, onehot_bcv, lse_bc, jnp.sum((lse_bc - tl_bc) * m_bc)

  # Initial scan carries typed like what the body makes of them inside shard_map: the loss
  # varies over the token shards, dW over the token shards and the vocabulary split.
  vary = lambda x, axes: jax.lax.pcast(x, axes, to='varying') if axes else x
  acc0 = vary(jnp.float32(0), token_axes)
  if not grads:
    nll, _ = jax.lax.scan(lambda acc, x: (acc + chunk(*x)[3], None), acc0, xs)
    return (jax.lax.psum(nll, token_axes) if token_axes else nll), None, None

  def body(carry, x):
    acc, dw_dv = carry
    h_bcd, tgt_bc, m_bc = x
    l_bcv, onehot_bcv, lse_bc, nll = chunk(h_bcd, tgt_bc, m_bc)
    d_bcv = (jnp.exp(l_bcv - lse_bc[..., None]) - onehot_bcv) * m_bc[..., None]
    d_bcv = d_bcv.astype(h_bcd.dtype)
    dh_bcd = jnp.einsum('bcv,dv->bcd', d_bcv, w_dv, preferred_element_type=jnp.float32)
    if vocab_axes:
      dh_bcd = jax.lax.psum(dh_bcd, vocab_axes)
    dw_dv = dw_dv + jnp.einsum('bcd,bcv->dv', h_bcd, d_bcv, preferred_element_type=jnp.float32)
    return (acc + nll, dw_dv), dh_bcd.astype(h_bcd.dtype)

  dw0 = vary(jnp.zeros(w_dv.shape, jnp.float32), token_axes + vocab_axes)
  (nll, dw_dv), dh_nbcd = jax.lax.scan(body, (acc0, dw0), xs)
  dh_btd = jnp.swapaxes(dh_nbcd, 0, 1).reshape(b, t, d)
  if token_axes:  # Once per call: the sums over this device's chunks are partial over tokens.
    nll, dw_dv = jax.lax.psum((nll, dw_dv), token_axes)
  return nll, dh_btd, dw_dv.astype(w_dv.dtype)


def _run(h_btd, w_dv, targets_bt, mask_bt, grads: bool):
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return _local(h_btd, w_dv, targets_bt, mask_bt, vocab_axes=(), token_axes=(), grads=grads)
  b, t, _ = h_btd.shape
  tok_spec = logical_to_spec(('batch', 'length'), (b, t), mesh)
  token_axes = tuple(a for part in tok_spec for a in spec_axes(part))
  vocab_part = logical_to_spec(('act_vocab',), (w_dv.shape[1],), mesh)[0]
  vocab_axes = tuple(a for a in spec_axes(vocab_part) if a not in token_axes)
  w_spec = P(None, vocab_axes or None)
  h_spec = P(*tok_spec, None)
  local = functools.partial(_local, vocab_axes=vocab_axes, token_axes=token_axes, grads=grads)
  out_specs = (P(), h_spec if grads else None, w_spec if grads else None)
  return jax.shard_map(local, mesh=mesh, in_specs=(h_spec, w_spec, tok_spec, tok_spec),
                       out_specs=out_specs)(h_btd, w_dv, targets_bt, mask_bt)


@jax.custom_vjp
def head_nll_sum(h_btd, w_dv, targets_bt, mask_bt):
  """sum over tokens of mask * (logsumexp(h @ w) - (h @ w)[target]), float32 scalar."""
  return _run(h_btd, w_dv, targets_bt, mask_bt, grads=False)[0]


def _fwd(h_btd, w_dv, targets_bt, mask_bt):
  nll, dh_btd, dw_dv = _run(h_btd, w_dv, targets_bt, mask_bt, grads=True)
  return nll, (dh_btd, dw_dv)


def _bwd(residuals, g):
  dh_btd, dw_dv = residuals
  return (dh_btd * g.astype(dh_btd.dtype), dw_dv * g.astype(dw_dv.dtype), None, None)


head_nll_sum.defvjp(_fwd, _bwd)
