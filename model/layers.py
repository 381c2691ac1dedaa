"""Building blocks: parameters with logical axes, RMSNorm, embeddings, RoPE, SwiGLU MLP.

Conventions used across model/:
  * every parameter is an `nnx.Param(value, axes=(logical names...))`; model/sharding.py maps
    the names onto the mesh;
  * parameters are stored in `cfg.weight_dtype` and cast to `cfg.dtype` (the compute dtype)
    right before use;
  * tensor names carry their shape: b batch, t query length, s key length, d model width,
    n query heads, k kv heads, h head dim, f MLP width, v vocab, e experts.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.sharding import constrain


def param(rngs: nnx.Rngs, shape, axes, dtype, fan_in: int | None = None, init: str = 'normal'):
  """A parameter with logical `axes`: truncated-normal scaled by 1/sqrt(fan_in), or ones/zeros."""
  assert len(shape) == len(axes), (shape, axes)
  if init == 'ones':
    value = jnp.ones(shape, dtype)
  elif init == 'zeros':
    value = jnp.zeros(shape, dtype)
  else:
    std = 1.0 / math.sqrt(fan_in if fan_in is not None else shape[0])
    value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
    value = value.astype(dtype)
  return nnx.Param(value, axes=tuple(axes))


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs):
    self.eps = cfg.norm_eps
    self.dtype = cfg.dtype
    self.scale = param(rngs, (dim,), ('norm',), cfg.weight_dtype, init='ones')

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class Embed(nnx.Module):
  """Token embedding; `attend` reuses the table as a tied output head."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.dtype = cfg.dtype
    self.table_vd = param(rngs, (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'), cfg.weight_dtype,
                          fan_in=cfg.d_model)

  def __call__(self, tokens_bt):
    x_btd = jnp.take(self.table_vd[...], tokens_bt, axis=0).astype(self.dtype)
    return constrain(x_btd, ('batch', 'length', 'act_embed'))

  def attend(self, x_btd):
    table_vd = self.table_vd[...].astype(self.dtype)
    return jnp.einsum('btd,vd->btv', x_btd, table_vd)


def rope(x_btnh, positions_bt, theta: float):
  """Rotary embedding, 'rotate half' layout (first half of h pairs with the second half)."""
  h = x_btnh.shape[-1]
  freq_h = theta ** (-jnp.arange(0, h // 2, dtype=jnp.float32) * 2.0 / h)
  angle_bth = positions_bt[..., None].astype(jnp.float32) * freq_h
  sin, cos = jnp.sin(angle_bth)[:, :, None, :], jnp.cos(angle_bth)[:, :, None, :]
  x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_btnh.dtype)


class SwiGLU(nnx.Module):
  """down(silu(x @ gate) * (x @ up))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f, w = cfg.d_model, cfg.mlp_dim, cfg.weight_dtype
    self.dtype = cfg.dtype
    self.gate_df = param(rngs, (d, f), ('embed', 'mlp'), w)
    self.up_df = param(rngs, (d, f), ('embed', 'mlp'), w)
    self.down_fd = param(rngs, (f, d), ('mlp', 'embed'), w)

  def __call__(self, x_btd):
    dt = self.dtype
    return swiglu(x_btd, self.gate_df[...].astype(dt), self.up_df[...].astype(dt),
                  self.down_fd[...].astype(dt))


_HIDDEN = ('batch', 'length', 'act_mlp')


@jax.custom_vjp
def swiglu(x_btd, gate_df, up_df, down_fd):
  """down(silu(x @ gate) * (x @ up)), with its backward pass written out.

  Autodiff fuses the SiLU derivative (several inputs) into the transpose that feeds each
  weight-gradient matmul, and XLA:CPU runs such transposing fusions with strided reads, slower
  than the matmuls themselves. Written out, every matmul operand is one plain array
  (benchmarks/bench_dense.py). The forward keeps x, g and u; the backward recomputes
  h = silu(g) * u next to the SiLU derivative (one [b, t, f] residual fewer per layer).
  """
  return _swiglu_fwd(x_btd, gate_df, up_df, down_fd)[0]


def _swiglu_fwd(x_btd, gate_df, up_df, down_fd):
  g_btf = constrain(jnp.einsum('btd,df->btf', x_btd, gate_df), _HIDDEN)
  u_btf = constrain(jnp.einsum('btd,df->btf', x_btd, up_df), _HIDDEN)
  h_btf = constrain(jax.nn.silu(g_btf) * u_btf, _HIDDEN)
  y_btd = jnp.einsum('btf,fd->btd', h_btf, down_fd)
  return y_btd, (x_btd, g_btf, u_btf, gate_df, up_df, down_fd)


def _swiglu_bwd(residuals, dy_btd):
  x_btd, g_btf, u_btf, gate_df, up_df, down_fd = residuals
  h_btf = constrain(jax.nn.silu(g_btf) * u_btf, _HIDDEN)
  dh_btf = constrain(jnp.einsum('btd,fd->btf', dy_btd, down_fd), _HIDDEN)
  d_down_fd = jnp.einsum('mf,md->fd', merge_rows(h_btf), merge_rows(dy_btd))
  # silu(g) = g * s with s = sigmoid(g); silu'(g) = s * (1 + g * (1 - s)). Float32 elementwise.
  g32, u32, dh32 = (a.astype(jnp.float32) for a in (g_btf, u_btf, dh_btf))
  s32 = jax.nn.sigmoid(g32)
  dg_btf = constrain((dh32 * u32 * s32 * (1.0 + g32 * (1.0 - s32))).astype(g_btf.dtype), _HIDDEN)
  du_btf = constrain((dh32 * g32 * s32).astype(u_btf.dtype), _HIDDEN)
  x_md = merge_rows(x_btd)
  d_gate_df = jnp.einsum('md,mf->df', x_md, merge_rows(dg_btf))
  d_up_df = jnp.einsum('md,mf->df', x_md, merge_rows(du_btf))
  dx_btd = jnp.einsum('btf,df->btd', dg_btf, gate_df) + jnp.einsum('btf,df->btd', du_btf, up_df)
  return dx_btd, d_gate_df, d_up_df, d_down_fd


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def merge_rows(a, lead: int = 0):
  """Merges the dims between the first `lead` and the last into one row dim (a free reshape):
  [b, t, d] -> [b*t, d]; [e, b, c, d] -> [e, b*c, d] with lead=1.

  Weight gradients contract over all token dims. Given two contracting dims (b and t), XLA:CPU
  first transposes the operand to put them minor, and when the operand is a layer-scan residual
  that transpose is fused with the dynamic-slice that reads it, a strided copy about as slow as
  the matmul. One merged row dim is contracted in place (a scan of MoE weight-gradient matmuls:
  71 -> 84 GFLOP/s; the whole model: benchmarks/results/moe_model_cpu.md).
  """
  return a.reshape(*a.shape[:lead], -1, a.shape[-1])
