"""Building blocks: parameters with logical axes, RMSNorm, embeddings, RoPE, SwiGLU MLP.

Conventions of model/: every parameter is an `nnx.Param(value, axes=(logical names...))`
(model/sharding.py maps them onto the mesh), stored in `cfg.weight_dtype` and cast to `cfg.dtype`
right before use; tensor names carry their shape: b batch, t query length, s key length,
d model width, n query heads, k kv heads, h head dim, f MLP width, v vocab, e experts.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.sharding import constrain


def param(rngs: nnx.Rngs, shape, axes, dtype, fan_in: int | None = None, init: str = 'normal'):
  """A parameter with logical `axes`: truncated-normal scaled by 1/sqrt(fan_in), or ones/zeros."""
  assert len(shape) == len(axes), (shape, axes)
  if init in ('ones', 'zeros'):
    value = (jnp.ones if init == 'ones' else jnp.zeros)(shape, dtype)
  else:
    std = 1.0 / math.sqrt(fan_in if fan_in is not None else shape[0])
    value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
    value = value.astype(dtype)
  return nnx.Param(value, axes=tuple(axes))


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs):
    self.eps, self.dtype = cfg.norm_eps, cfg.dtype
    self.scale = param(rngs, (dim,), ('norm',), cfg.weight_dtype, init='ones')

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class Embed(nnx.Module):
  """Token embedding (a tied output head reads `table_vd`: Decoder.head_matrix)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.dtype = cfg.dtype
    self.table_vd = param(rngs, (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'), cfg.weight_dtype,
                          fan_in=cfg.d_model)

  def __call__(self, tokens_bt):
    x_btd = jnp.take(self.table_vd[...], tokens_bt, axis=0).astype(self.dtype)
    return constrain(x_btd, ('batch', 'length', 'act_embed'))


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


class Layout(NamedTuple):
  """Einsum letters and logical axes of a SwiGLU: `group` leads the weights and the rows (''
  for a dense MLP, 'e' for stacked experts), `rows` are the token dims of x."""
  group: str
  rows: str
  hidden_axes: tuple
  out_axes: tuple | None  # Constraint on y and dx; None: left to the partitioner.


DENSE = Layout('', 'bt', ('batch', 'length', 'act_mlp'), None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def swiglu_of(layout: Layout, x, gate, up, down):
  """down(silu(x @ gate) * (x @ up)) with its backward written out, every matmul operand one
  plain array; saves x, g, u (the backward recomputes h). Reverse mode only (custom VJP)."""
  return _swiglu_fwd(layout, x, gate, up, down)[0]


def _letters(layout: Layout):
  g, r = layout.group, layout.rows
  return g + r + 'd', g + 'df', g + r + 'f', g + 'fd'


def _swiglu_fwd(layout, x, gate, up, down):
  x_, w_in, h_, w_out = _letters(layout)
  hidden = lambda a: constrain(a, layout.hidden_axes)
  g = hidden(jnp.einsum(f'{x_},{w_in}->{h_}', x, gate))
  u = hidden(jnp.einsum(f'{x_},{w_in}->{h_}', x, up))
  y = jnp.einsum(f'{h_},{w_out}->{x_}', hidden(jax.nn.silu(g) * u), down)
  return constrain(y, layout.out_axes), (x, g, u, gate, up, down)


def _swiglu_bwd(layout, residuals, dy):
  x, g, u, gate, up, down = residuals
  x_, w_in, h_, w_out = _letters(layout)
  hidden = lambda a: constrain(a, layout.hidden_axes)
  lead, m = len(layout.group), layout.group + 'm'
  dy = constrain(dy, layout.out_axes)
  h = hidden(jax.nn.silu(g) * u)
  dh = hidden(jnp.einsum(f'{x_},{w_out}->{h_}', dy, down))
  d_down = jnp.einsum(f'{m}f,{m}d->{w_out}', merge_rows(h, lead), merge_rows(dy, lead))
  # silu(g) = g * s with s = sigmoid(g); silu'(g) = s * (1 + g * (1 - s)). Float32 elementwise.
  g32, u32, dh32 = (a.astype(jnp.float32) for a in (g, u, dh))
  s32 = jax.nn.sigmoid(g32)
  dg = hidden((dh32 * u32 * s32 * (1.0 + g32 * (1.0 - s32))).astype(g.dtype))
  du = hidden((dh32 * g32 * s32).astype(u.dtype))
  x_m = merge_rows(x, lead)
  d_gate = jnp.einsum(f'{m}d,{m}f->{w_in}', x_m, merge_rows(dg, lead))
  d_up = jnp.einsum(f'{m}d,{m}f->{w_in}', x_m, merge_rows(du, lead))
  dx = constrain(jnp.einsum(f'{h_},{w_in}->{x_}', dg, gate) +
                 jnp.einsum(f'{h_},{w_in}->{x_}', du, up), layout.out_axes)
  return dx, d_gate, d_up, d_down


swiglu_of.defvjp(_swiglu_fwd, _swiglu_bwd)


def swiglu(x_btd, gate_df, up_df, down_fd):
  """The dense MLP's `swiglu_of`."""
  return swiglu_of(DENSE, x_btd, gate_df, up_df, down_fd)


def merge_rows(a, lead: int = 0):
  """The dims between the first `lead` and the last merged into one row dim (a free reshape) for
  weight-gradient matmuls: [b, t, d] -> [b*t, d]; [e, b, c, d] -> [e, b*c, d] with lead=1."""
  return a.reshape(*a.shape[:lead], -1, a.shape[-1])
