"""Sparse mixture-of-experts feed-forward block (Mixtral-style), a drop-in for `layers.SwiGLU`.

Each token takes its top k experts of a float32 linear router (ties to the lower index), weighed
by a softmax over the k selected logits; in training the router input may be scaled by uniform
noise in [1 - router_jitter, 1 + router_jitter]. Experts are SwiGLU MLPs stacked on a leading
`expert` axis. cfg.dispatch 'capacity' (`capacity` slots per expert per batch row, priority by
`slot_positions`, other weights not renormalised), 'dropless' (grouped matmuls in
`jax.shard_map` on each device's own tokens) and 'reference' (a masked dense loop over experts)
compute the same function when nothing drops (docs/moe.md).

Auxiliary outputs (float32 scalars, summable over layers), with n = b*t tokens:
  * load_balance_loss = e * sum_e f_e * P_e (Switch), f_e = assignments to e (all k choices,
    before drops) / (n k), P_e = mean over tokens of softmax(logits)_e (1.0 when uniform);
  * router_z_loss = mean over tokens of logsumexp(logits)^2 (ST-MoE);
  * aux_loss = load_balance_weight * load_balance_loss + router_z_weight * router_z_loss;
  * dropped_fraction: dropped assignments / (n k) (0 for 'dropless' and 'reference');
  * router_entropy: mean entropy (nats) of softmax(logits);
  * expert_load_min / expert_load_max: min / max over experts of f_e (1/e when balanced).
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from model.config import ConfigError, ModelConfig
from model.layers import Layout, param, swiglu_of
from model.sharding import constrain, logical_to_spec, mesh_platform, spec_axes

AUX_KEYS = ('aux_loss', 'load_balance_loss', 'router_z_loss', 'dropped_fraction', 'router_entropy',
            'expert_load_min', 'expert_load_max')

_BUFFER_AXES = ('act_expert', 'batch', 'capacity', 'act_embed')


def capacity(cfg: ModelConfig, tokens_per_group: int) -> int:
  """Slots per expert per group: ceil(capacity_factor * t * k / e), at most t."""
  c = math.ceil(cfg.capacity_factor * tokens_per_group * cfg.experts_per_token / cfg.num_experts)
  return max(1, min(tokens_per_group, c))


def slot_positions(experts_btk, num_experts: int):
  """Position of each assignment in its expert's buffer, per row: top-1 choices in token order,
  then top-2 choices, ... (position counts earlier assignments to the same expert)."""
  b, t, k = experts_btk.shape
  onehot_bkte = jax.nn.one_hot(jnp.swapaxes(experts_btk, 1, 2), num_experts, dtype=jnp.int32)
  flat_bne = onehot_bkte.reshape(b, k * t, num_experts)
  before_bne = jnp.cumsum(flat_bne, axis=1) - flat_bne
  pos_bkt = jnp.sum(before_bne * flat_bne, axis=-1).reshape(b, k, t)
  return jnp.swapaxes(pos_bkt, 1, 2)


def top_k(logits_bte, k: int):
  """(values_btk, indices_btk) of the k largest logits, ties to the lower index like
  `lax.top_k`, from k argmax rounds: local to each batch shard (a TopK op all-gathers it)."""
  e = logits_bte.shape[-1]
  masked_bte = logits_bte
  values, indices = [], []
  for _ in range(k):
    index_bt = jnp.argmax(masked_bte, axis=-1).astype(jnp.int32)
    chosen_bte = jax.nn.one_hot(index_bt, e, dtype=jnp.bool_)
    values.append(jnp.sum(jnp.where(chosen_bte, logits_bte, 0.0), axis=-1))
    indices.append(index_bt)
    masked_bte = jnp.where(chosen_bte, -jnp.inf, masked_bte)
  return jnp.stack(values, axis=-1), jnp.stack(indices, axis=-1)


# The SwiGLU of every expert on its [b, c] buffer slots (model/layers.py swiglu_of).
EXPERTS = Layout('e', 'bc', ('act_expert', 'batch', 'capacity', 'act_mlp'), _BUFFER_AXES)


def grouped_matmul_kernel(name: str, platform: str | None = None) -> str:
  """The kernel `cfg.grouped_matmul` means on `platform` (default: the one compiled for)."""
  if name != 'auto':
    return name
  return 'gmm' if (platform or mesh_platform()) == 'tpu' else 'ragged_dot'


def _gmm_tile(size: int) -> int:
  return next(t for t in (512, 256, 128, size) if size % t == 0)


def grouped_matmul(x_md, w_eij, group_sizes_e, kernel: str):
  """[m, j] in x's dtype: row r of group e (group_sizes_e[e] rows each, sorted) times w_eij[e].
  'gmm' needs a row tile dividing m: zero rows are appended to the last group and sliced off."""
  if kernel == 'ragged_dot':
    return jax.lax.ragged_dot(x_md, w_eij, group_sizes_e)
  if kernel != 'gmm':
    raise ConfigError(f'model.grouped_matmul: {kernel!r} is not one of ragged_dot, gmm, auto')
  from jax.experimental.pallas.ops.tpu.megablox import ops as megablox  # Pallas TPU import: only when used.
  m, i = x_md.shape
  tm = min(512, -(-m // 128) * 128)
  pad = -m % tm
  x_pd = jnp.pad(x_md, ((0, pad), (0, 0)))
  sizes_e = group_sizes_e.at[-1].add(pad)
  tiling = (tm, _gmm_tile(i), _gmm_tile(w_eij.shape[-1]))
  y_pj = megablox.gmm(x_pd, w_eij, sizes_e, x_md.dtype, tiling, None, None, False,
                      mesh_platform() != 'tpu')
  return y_pj[:m]


def _dropless_local(x_btd, experts_btk, weights_btk, gate_edf, up_edf, down_efd, *, k: int, e: int,
                    kernel: str, psum_axes: tuple[str, ...] = ()):
  """Dropless experts on the tokens at hand (one device's, under shard_map): assignments sorted
  by expert, grouped matmuls, partial outputs summed over `psum_axes`."""
  b, t, d = x_btd.shape
  experts_m = experts_btk.reshape(b * t * k)
  order_m = jnp.argsort(experts_m, stable=True)  # Assignment m of the sorted list.
  x_md = jnp.take(x_btd.reshape(b * t, d), order_m // k, axis=0)
  group_sizes_e = jnp.bincount(experts_m, length=e).astype(jnp.int32)
  h_mf = (jax.nn.silu(grouped_matmul(x_md, gate_edf, group_sizes_e, kernel)) *
          grouped_matmul(x_md, up_edf, group_sizes_e, kernel))
  y_md = grouped_matmul(h_mf, down_efd, group_sizes_e, kernel)
  unsort_m = jnp.zeros_like(order_m).at[order_m].set(jnp.arange(order_m.size, dtype=order_m.dtype))
  y_btkd = jnp.take(y_md, unsort_m, axis=0).reshape(b, t, k, d)
  y_btd = jnp.einsum('btk,btkd->btd', weights_btk.astype(x_btd.dtype), y_btkd)
  return jax.lax.psum(y_btd, psum_axes) if psum_axes else y_btd


class MoeBlock(nnx.Module):
  """Top-k routed SwiGLU experts; returns (y_btd, aux) — see the module docstring."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    if not cfg.is_moe:
      raise ConfigError(f'model.num_experts: MoeBlock needs num_experts > 0, got {cfg.num_experts}')
    cfg.validate()
    self.cfg = cfg
    d, f, e, w = cfg.d_model, cfg.expert_mlp_dim, cfg.num_experts, cfg.weight_dtype
    self.router_de = param(rngs, (d, e), ('embed', None), w)
    self.gate_edf = param(rngs, (e, d, f), ('expert', 'expert_embed', 'expert_mlp'), w, fan_in=d)
    self.up_edf = param(rngs, (e, d, f), ('expert', 'expert_embed', 'expert_mlp'), w, fan_in=d)
    self.down_efd = param(rngs, (e, f, d), ('expert', 'expert_mlp', 'expert_embed'), w, fan_in=f)

  def route(self, x_btd, *, rngs: nnx.Rngs | None = None, deterministic: bool = True):
    """Returns (logits_bte float32, experts_btk int32, weights_btk float32)."""
    cfg = self.cfg
    x32_btd = x_btd.astype(jnp.float32)
    if not deterministic and cfg.router_jitter > 0:
      if rngs is None:
        raise ValueError(f'MoeBlock: model.router_jitter={cfg.router_jitter} with '
                         'deterministic=False needs `rngs` (a `jitter` or `default` stream)')
      noise_btd = jax.random.uniform(rngs.jitter(), x32_btd.shape, jnp.float32,
                                     1.0 - cfg.router_jitter, 1.0 + cfg.router_jitter)
      x32_btd = x32_btd * noise_btd
    logits_bte = jnp.einsum('btd,de->bte', x32_btd, self.router_de[...].astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
    top_logits_btk, experts_btk = top_k(logits_bte, cfg.experts_per_token)
    weights_btk = jax.nn.softmax(top_logits_btk, axis=-1)
    return logits_bte, experts_btk.astype(jnp.int32), weights_btk

  def __call__(self, x_btd, *, rngs: nnx.Rngs | None = None, deterministic: bool = True):
    cfg = self.cfg
    if x_btd.ndim != 3 or x_btd.shape[-1] != cfg.d_model:
      raise ValueError(f'MoeBlock: expected x_btd of shape [b, t, {cfg.d_model}] (model.d_model), '
                       f'got {x_btd.shape}')
    x_btd = x_btd.astype(cfg.dtype)
    logits_bte, experts_btk, weights_btk = self.route(x_btd, rngs=rngs, deterministic=deterministic)
    # cfg.validate() in __init__ checked the name; kept_btk is None where nothing drops.
    dispatch = {'capacity': self._capacity, 'dropless': self._dropless,
                'reference': self._reference}[cfg.dispatch]
    y_btd, kept_btk = dispatch(x_btd, experts_btk, weights_btk)
    y_btd = constrain(y_btd.astype(cfg.dtype), ('batch', 'length', 'act_embed'))
    return y_btd, self._aux(logits_bte, experts_btk, kept_btk)

  def _experts(self):
    dt = self.cfg.dtype
    return (self.gate_edf[...].astype(dt), self.up_edf[...].astype(dt),
            self.down_efd[...].astype(dt))

  def _capacity(self, x_btd, experts_btk, weights_btk):
    (b, t, d), e, k = x_btd.shape, self.cfg.num_experts, self.cfg.experts_per_token
    c = capacity(self.cfg, t)
    pos_btk = slot_positions(experts_btk, e)
    kept_btk = pos_btk < c
    # Slot of each kept assignment in the row's flattened [e * c] buffer; e * c marks a drop.
    slot_btk = jnp.where(kept_btk, experts_btk * c + pos_btk, e * c)
    # Inverse map, slot -> token; empty slots point at an appended zero row (index t). Row-wise
    # ops are vmapped so the gathers/scatters carry batch dims the partitioner keeps local.
    token_n = jnp.repeat(jnp.arange(t, dtype=jnp.int32), k)
    slot_bn = slot_btk.reshape(b, t * k)
    empty_s = jnp.full((e * c,), t, jnp.int32)
    token_bs = jax.vmap(lambda s_n: empty_s.at[s_n].set(token_n, mode='drop'))(slot_bn)
    take_rows = jax.vmap(lambda rows, index: jnp.take(rows, index, axis=0))
    xpad_btd = jnp.concatenate([x_btd, jnp.zeros((b, 1, d), x_btd.dtype)], axis=1)
    x_bsd = take_rows(xpad_btd, token_bs)
    x_ebcd = constrain(jnp.swapaxes(x_bsd.reshape(b, e, c, d), 0, 1), _BUFFER_AXES)
    y_ebcd = swiglu_of(EXPERTS, x_ebcd, *self._experts())
    y_bsd = constrain(jnp.swapaxes(y_ebcd, 0, 1).reshape(b, e * c, d), ('batch', None, 'act_embed'))
    ypad_bsd = jnp.concatenate([y_bsd, jnp.zeros((b, 1, d), y_bsd.dtype)], axis=1)
    y_btkd = take_rows(ypad_bsd, slot_bn).reshape(b, t, k, d)
    combine_btk = (weights_btk * kept_btk).astype(x_btd.dtype)
    return jnp.einsum('btk,btkd->btd', combine_btk, y_btkd), kept_btk

  def _dropless(self, x_btd, experts_btk, weights_btk):
    """(y, None): sort + grouped matmul on each device's tokens (their activation sharding);
    expert weights gathered but for the MLP width, still split (a psum adds partial outputs)."""
    experts = self._experts()
    kernel = grouped_matmul_kernel(self.cfg.grouped_matmul)
    local = functools.partial(_dropless_local, k=self.cfg.experts_per_token,
                              e=self.cfg.num_experts, kernel=kernel)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
      return local(x_btd, experts_btk, weights_btk, *experts), None
    x_spec = logical_to_spec(('batch', 'length', None), x_btd.shape, mesh)
    used = {a for part in x_spec for a in spec_axes(part)}
    f_spec = logical_to_spec(('expert_mlp',), experts[0].shape[-1:], mesh)[0]
    f_axes = tuple(a for a in spec_axes(f_spec) if a not in used)
    f_part = f_axes or None
    w_specs = (P(None, None, f_part), P(None, None, f_part), P(None, f_part, None))
    # Pallas kernels declare no varying-manual-axes types: shard_map's check is off for gmm.
    return jax.shard_map(functools.partial(local, psum_axes=f_axes), mesh=mesh,
                         in_specs=(x_spec, x_spec, x_spec) + w_specs, out_specs=x_spec,
                         check_vma=kernel != 'gmm')(x_btd, experts_btk, weights_btk, *experts), None

  def _reference(self, x_btd, experts_btk, weights_btk):
    gate_edf, up_edf, down_efd = self._experts()
    y_btd = jnp.zeros_like(x_btd)
    for i in range(self.cfg.num_experts):
      w_bt = jnp.sum(jnp.where(experts_btk == i, weights_btk, 0.0), axis=-1).astype(x_btd.dtype)
      h_btf = jax.nn.silu(x_btd @ gate_edf[i]) * (x_btd @ up_edf[i])
      y_btd = y_btd + w_bt[..., None] * (h_btf @ down_efd[i])
    return y_btd, None

  def _aux(self, logits_bte, experts_btk, kept_btk):
    cfg, e = self.cfg, self.cfg.num_experts
    probs_bte = jax.nn.softmax(logits_bte, axis=-1)
    load_e = jnp.mean(jax.nn.one_hot(experts_btk, e, dtype=jnp.float32), axis=(0, 1, 2))
    load_balance = e * jnp.sum(load_e * jnp.mean(probs_bte, axis=(0, 1)))
    z_loss = jnp.mean(jnp.square(jax.nn.logsumexp(logits_bte, axis=-1)))
    entropy = jnp.mean(-jnp.sum(probs_bte * jax.nn.log_softmax(logits_bte, axis=-1), axis=-1))
    dropped = 0.0 if kept_btk is None else 1.0 - jnp.mean(kept_btk.astype(jnp.float32))
    aux = {'aux_loss': cfg.load_balance_weight * load_balance + cfg.router_z_weight * z_loss,
           'load_balance_loss': load_balance, 'router_z_loss': z_loss, 'dropped_fraction': dropped,
           'router_entropy': entropy, 'expert_load_min': jnp.min(load_e),
           'expert_load_max': jnp.max(load_e)}
    return {name: jnp.asarray(aux[name], jnp.float32) for name in AUX_KEYS}
