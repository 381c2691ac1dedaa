"""Sparse mixture-of-experts feed-forward block (Mixtral-style), a drop-in for `layers.SwiGLU`.

Routing. A float32 linear router gives logits_bte; each token picks its top k experts
(k = cfg.experts_per_token; ties go to the lower expert index) and weighs them
with a softmax over the k selected logits (= Mixtral's softmax-then-renormalise). In training
(`deterministic=False`, rngs given) the router input may be multiplied by uniform noise in
[1 - cfg.router_jitter, 1 + cfg.router_jitter]; experts always see the clean input.

Experts are SwiGLU MLPs whose weights are stacked on a leading `expert` axis. Three dispatch
implementations (cfg.dispatch) compute the same function whenever nothing is dropped:
  * 'capacity': every expert has a fixed buffer of c slots per group, with
      c = min(t, ceil(capacity_factor * t * k / e)),
    a group being one batch row (t tokens). Assignments beyond c are dropped: that expert's term
    is left out of the token's output (the residual connection still carries the token) and the
    other selected weights are NOT renormalised. Priority within a row: all top-1 choices in
    token order first, then all top-2 choices in token order, and so on. Rows are the groups
    because each row's slot positions then come from a cumsum over that row alone: the result
    does not depend on how the batch is split over devices, and nothing needs a cross-device
    prefix sum. capacity_factor >= e / k makes c = t, so nothing can be dropped (the cap at t
    only trims slots that can never fill: a token picks an expert at most once).
    Tokens are moved into the [e, b, c, d] expert buffers with an index gather (and back with a
    gather of each token's k slots); the backward passes are scatter-adds. This keeps memory at
    O(b t k) indices instead of the O(b t e c) one-hot dispatch/combine tensors of GShard-style
    einsum dispatch, whose matmuls cost O(b t^2 k d) (quadratic in the row length): on CPU the two
    tie at 256-token rows and gather wins clearly at 1024 (benchmarks/results/moe_block*.md).
  * 'dropless': token-expert assignments sorted by expert and multiplied with grouped matmuls;
    group sizes are traced values, nothing is dropped. The grouped matmul (cfg.grouped_matmul)
    is `jax.lax.ragged_dot` or the megablox Pallas kernel `gmm` (TPU; the Pallas interpreter
    elsewhere); 'auto' takes `gmm` when compiling for TPU (the mesh's platform) and
    `ragged_dot` otherwise (docs/scale.md compares the two as compiled by XLA:TPU).
  * 'reference': a Python loop over experts, each applied densely to every token and masked by
    its routing weight. Simple enough to trust; tests compare the others against it.
The capacity path runs the experts through `expert_swiglu`, whose backward is written out (see
there: autodiff's version is slower on XLA:CPU); as a custom VJP it supports
reverse mode (grad, remat) but not forward-mode `jax.jvp`.

Expert parallelism. Expert weights carry the logical `expert` axis (mesh axis `expert`), and
the dispatched buffer x_ebcd is annotated with ('act_expert', 'batch', 'capacity', 'act_embed')
via `sharding.constrain`. Tokens arrive sharded over batch (whose mesh axes include `expert`);
the annotation asks for them sharded over experts instead, and the SPMD partitioner resolves
the change with an all-to-all, runs each expert on its own devices, and sends results back the
same way for the combine. We use these compiler-resolved annotations rather than a hand-written
`shard_map` all-to-all because the same model code then runs unchanged on any mesh (expert=1,
expert split with fsdp/tensor, a single device, a notebook with no mesh), stays differentiable
with no custom transposes, and lets XLA fuse/overlap the collectives; the cost is that the
communication is chosen by the compiler (tests/test_moe.py checks that an all-to-all is what
it picks). 'dropless' runs inside `jax.shard_map` over each device's own tokens: the sort and
the grouped matmuls are local, the expert weights arrive gathered over the `fsdp` and `expert`
axes (FSDP for experts: no all-to-all, tokens never leave their device) and stay split over
`tensor` on the MLP width, whose partial outputs a psum adds. So `expert` > 1 with dropless is
data parallelism plus expert-weight sharding at rest; capacity dispatch is the all-to-all
expert-parallel path. (A sort over the whole global batch, as an unsharded argsort would do,
makes every device hold every device's tokens: ~600 GiB per device for Mixtral's batch.)

Auxiliary outputs (float32 scalars, summable over layers), with n = b*t tokens:
  * load_balance_loss = e * sum_e f_e * P_e (Switch Transformer), f_e = (assignments to e over
    all k choices, before capacity drops) / (n * k), P_e = mean over tokens of softmax(logits)_e.
    Both sum to 1, so the loss is exactly 1.0 whenever f or P is uniform (balanced routing, the
    value the loss pushes towards); concentrating both on k experts gives e / k.
  * router_z_loss = mean over tokens of logsumexp(logits)^2 (ST-MoE).
  * aux_loss = cfg.load_balance_weight * load_balance_loss + cfg.router_z_weight * router_z_loss:
    the caller adds this to the training loss.
  * dropped_fraction: dropped assignments / (n * k) (0 for 'dropless' and 'reference').
  * router_entropy: mean over tokens of the entropy (nats) of softmax(logits).
  * expert_load_min / expert_load_max: min / max over experts of f_e (1/e when balanced).
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from model.config import DISPATCH_IMPLS, ConfigError, ModelConfig
from model.layers import merge_rows, param
from model.sharding import constrain, logical_to_spec, mesh_platform, spec_axes

AUX_KEYS = ('aux_loss', 'load_balance_loss', 'router_z_loss', 'dropped_fraction', 'router_entropy',
            'expert_load_min', 'expert_load_max')

_BUFFER_AXES = ('act_expert', 'batch', 'capacity', 'act_embed')
_HIDDEN_AXES = ('act_expert', 'batch', 'capacity', 'act_mlp')


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
  `lax.top_k`. Built from k argmax rounds because XLA's SPMD partitioner all-gathers the batch
  for a TopK op, while these reductions and selects stay local to each batch shard."""
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


@jax.custom_vjp
def expert_swiglu(x_ebcd, gate_edf, up_edf, down_efd):
  """down(silu(x @ gate) * (x @ up)) of every expert on its [b, c] buffer slots.

  The backward pass is written out (`_swiglu_bwd`) instead of left to autodiff for speed on
  CPU: autodiff fuses the SiLU derivative (five inputs) into the transpose that feeds each
  weight-gradient matmul, and XLA:CPU runs that transposing fusion with page-strided reads
  (2048 x 2048 float32: 164 ms, against 9 ms for the plain transpose plus 6 ms for the
  elementwise math unfused). Written out, every matmul operand is one plain array. The forward
  keeps x, g and u; the backward recomputes h = silu(g) * u next to the SiLU derivative (one
  [e, b, c, f] residual fewer per layer, and in a layer scan one stacked copy fewer each way).
  """
  return _swiglu_fwd(x_ebcd, gate_edf, up_edf, down_efd)[0]


def _swiglu_fwd(x_ebcd, gate_edf, up_edf, down_efd):
  g_ebcf = constrain(jnp.einsum('ebcd,edf->ebcf', x_ebcd, gate_edf), _HIDDEN_AXES)
  u_ebcf = constrain(jnp.einsum('ebcd,edf->ebcf', x_ebcd, up_edf), _HIDDEN_AXES)
  h_ebcf = constrain(jax.nn.silu(g_ebcf) * u_ebcf, _HIDDEN_AXES)
  y_ebcd = constrain(jnp.einsum('ebcf,efd->ebcd', h_ebcf, down_efd), _BUFFER_AXES)
  return y_ebcd, (x_ebcd, g_ebcf, u_ebcf, gate_edf, up_edf, down_efd)


def _swiglu_bwd(residuals, dy_ebcd):
  x_ebcd, g_ebcf, u_ebcf, gate_edf, up_edf, down_efd = residuals
  dy_ebcd = constrain(dy_ebcd, _BUFFER_AXES)
  h_ebcf = constrain(jax.nn.silu(g_ebcf) * u_ebcf, _HIDDEN_AXES)
  dh_ebcf = constrain(jnp.einsum('ebcd,efd->ebcf', dy_ebcd, down_efd), _HIDDEN_AXES)
  d_down_efd = jnp.einsum('emf,emd->efd', merge_rows(h_ebcf, 1), merge_rows(dy_ebcd, 1))
  # silu(g) = g * s with s = sigmoid(g); silu'(g) = s * (1 + g * (1 - s)). Float32 elementwise.
  g32, u32, dh32 = (a.astype(jnp.float32) for a in (g_ebcf, u_ebcf, dh_ebcf))
  s32 = jax.nn.sigmoid(g32)
  dg_ebcf = constrain((dh32 * u32 * s32 * (1.0 + g32 * (1.0 - s32))).astype(g_ebcf.dtype),
                      _HIDDEN_AXES)
  du_ebcf = constrain((dh32 * g32 * s32).astype(u_ebcf.dtype), _HIDDEN_AXES)
  x_emd = merge_rows(x_ebcd, 1)  # Weight gradients contract over merged rows: see merge_rows.
  d_gate_edf = jnp.einsum('emd,emf->edf', x_emd, merge_rows(dg_ebcf, 1))
  d_up_edf = jnp.einsum('emd,emf->edf', x_emd, merge_rows(du_ebcf, 1))
  dx_ebcd = constrain(jnp.einsum('ebcf,edf->ebcd', dg_ebcf, gate_edf) +
                      jnp.einsum('ebcf,edf->ebcd', du_ebcf, up_edf), _BUFFER_AXES)
  return dx_ebcd, d_gate_edf, d_up_edf, d_down_efd


expert_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def _dropless_shard_specs(shape_btd, f: int, mesh):
  """shard_map specs for the dropless path: tokens keep their activation sharding (batch, and
  length if sequence-sharded), expert weights are gathered except for the expert MLP width,
  which stays split over its mesh axes (tensor parallel; a psum adds the partial outputs)."""
  b, t, _ = shape_btd
  x_spec = logical_to_spec(('batch', 'length', None), (b, t, 1), mesh)
  used = {a for part in x_spec for a in spec_axes(part)}
  f_axes = tuple(a for a in spec_axes(logical_to_spec(('expert_mlp',), (f,), mesh)[0])
                 if a not in used)
  f_part = f_axes or None
  w_specs = (P(None, None, f_part), P(None, None, f_part), P(None, f_part, None))
  return x_spec, w_specs, f_axes


def grouped_matmul_kernel(name: str, platform: str | None = None) -> str:
  """The concrete kernel `cfg.grouped_matmul` means on `platform` (default: the platform being
  compiled for)."""
  if name != 'auto':
    return name
  return 'gmm' if (platform or mesh_platform()) == 'tpu' else 'ragged_dot'


def _gmm_tile(size: int) -> int:
  return next(t for t in (512, 256, 128, size) if size % t == 0)


def grouped_matmul(x_md, w_eij, group_sizes_e, kernel: str):
  """Rows of x_md are sorted by group, group e has group_sizes_e[e] rows (summing to m); row r
  of group e is multiplied by w_eij[e]. Returns [m, j] in x's dtype.

  'gmm' is megablox's kernel (custom VJP: gmm for dx, tgmm for dw), compiled for TPU and run
  in the Pallas interpreter on other platforms (tests). Its row tile must divide m: rows are
  padded with zeros, counted in the last group (zero rows add nothing to any gradient) and
  sliced off the result."""
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
                    psum_axes: tuple[str, ...], kernel: str = 'ragged_dot'):
  """Dropless experts on the tokens at hand: assignments sorted by expert, grouped matmuls.

  Under a mesh this runs inside `shard_map` on each device's own tokens, so the sort is local
  (a global argsort would make every device hold every device's tokens). The expert weights
  arrive gathered over FSDP and expert axes (FSDP semantics for the experts: dropless does not
  move tokens between devices; use capacity dispatch for all-to-all expert parallelism).
  """
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
    if cfg.dispatch == 'capacity':
      y_btd, kept_btk = self._capacity(x_btd, experts_btk, weights_btk)
    elif cfg.dispatch == 'dropless':
      y_btd, kept_btk = self._dropless(x_btd, experts_btk, weights_btk), None
    elif cfg.dispatch == 'reference':
      y_btd, kept_btk = self._reference(x_btd, experts_btk, weights_btk), None
    else:
      raise ConfigError(f'model.dispatch: {cfg.dispatch!r} is not one of {DISPATCH_IMPLS}')
    y_btd = constrain(y_btd.astype(cfg.dtype), ('batch', 'length', 'act_embed'))
    return y_btd, self._aux(logits_bte, experts_btk, kept_btk)

  def _experts(self):
    dt = self.cfg.dtype
    return (self.gate_edf[...].astype(dt), self.up_edf[...].astype(dt),
            self.down_efd[...].astype(dt))

  def _capacity(self, x_btd, experts_btk, weights_btk):
    b, t, d = x_btd.shape
    e = self.cfg.num_experts
    c = capacity(self.cfg, t)
    pos_btk = slot_positions(experts_btk, e)
    kept_btk = pos_btk < c
    # Slot of each kept assignment in the row's flattened [e * c] buffer; e * c marks a drop.
    slot_btk = jnp.where(kept_btk, experts_btk * c + pos_btk, e * c)
    # Inverse map, slot -> token; empty slots point at an appended zero row (index t). Row-wise
    # ops are vmapped so the gathers/scatters carry batch dims the partitioner keeps local.
    k = self.cfg.experts_per_token
    token_n = jnp.repeat(jnp.arange(t, dtype=jnp.int32), k)
    slot_bn = slot_btk.reshape(b, t * k)
    empty_s = jnp.full((e * c,), t, jnp.int32)
    token_bs = jax.vmap(lambda s_n: empty_s.at[s_n].set(token_n, mode='drop'))(slot_bn)
    take_rows = jax.vmap(lambda rows, index: jnp.take(rows, index, axis=0))
    xpad_btd = jnp.concatenate([x_btd, jnp.zeros((b, 1, d), x_btd.dtype)], axis=1)
    x_bsd = take_rows(xpad_btd, token_bs)
    x_ebcd = constrain(jnp.swapaxes(x_bsd.reshape(b, e, c, d), 0, 1), _BUFFER_AXES)
    y_ebcd = expert_swiglu(x_ebcd, *self._experts())
    y_bsd = constrain(jnp.swapaxes(y_ebcd, 0, 1).reshape(b, e * c, d),
                      ('batch', None, 'act_embed'))
    ypad_bsd = jnp.concatenate([y_bsd, jnp.zeros((b, 1, d), y_bsd.dtype)], axis=1)
    y_btkd = take_rows(ypad_bsd, slot_bn).reshape(b, t, k, d)
    combine_btk = (weights_btk * kept_btk).astype(x_btd.dtype)
    return jnp.einsum('btk,btkd->btd', combine_btk, y_btkd), kept_btk

  def _dropless(self, x_btd, experts_btk, weights_btk):
    """Sort + grouped matmul, run per device shard of the tokens (see `_dropless_shard_specs`)."""
    experts = self._experts()
    kernel = grouped_matmul_kernel(self.cfg.grouped_matmul)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
      return _dropless_local(x_btd, experts_btk, weights_btk, *experts, k=self.cfg.experts_per_token,
                             e=self.cfg.num_experts, psum_axes=(), kernel=kernel)
    x_spec, w_specs, f_axes = _dropless_shard_specs(x_btd.shape, experts[0].shape[-1], mesh)
    local = functools.partial(_dropless_local, k=self.cfg.experts_per_token,
                              e=self.cfg.num_experts, psum_axes=f_axes, kernel=kernel)
    # Pallas kernels declare no varying-manual-axes types: shard_map's check is off for gmm.
    return jax.shard_map(local, mesh=mesh, in_specs=(x_spec, x_spec, x_spec) + w_specs,
                         out_specs=x_spec, check_vma=kernel != 'gmm')(
                             x_btd, experts_btk, weights_btk, *experts)

  def _reference(self, x_btd, experts_btk, weights_btk):
    gate_edf, up_edf, down_efd = self._experts()
    y_btd = jnp.zeros_like(x_btd)
    for i in range(self.cfg.num_experts):
      w_bt = jnp.sum(jnp.where(experts_btk == i, weights_btk, 0.0), axis=-1).astype(x_btd.dtype)
      h_btf = jax.nn.silu(x_btd @ gate_edf[i]) * (x_btd @ up_edf[i])
      y_btd = y_btd + w_bt[..., None] * (h_btf @ down_efd[i])
    return y_btd

  def _aux(self, logits_bte, experts_btk, kept_btk):
    cfg = self.cfg
    e = cfg.num_experts
    probs_bte = jax.nn.softmax(logits_bte, axis=-1)
    counts_e = jnp.sum(jax.nn.one_hot(experts_btk, e, dtype=jnp.float32), axis=(0, 1, 2))
    load_e = counts_e / experts_btk.size
    mean_prob_e = jnp.mean(probs_bte, axis=(0, 1))
    load_balance = e * jnp.sum(load_e * mean_prob_e)
    z_loss = jnp.mean(jnp.square(jax.nn.logsumexp(logits_bte, axis=-1)))
    log_probs_bte = jax.nn.log_softmax(logits_bte, axis=-1)
    entropy = jnp.mean(-jnp.sum(probs_bte * log_probs_bte, axis=-1))
    dropped = (jnp.float32(0.0) if kept_btk is None
               else 1.0 - jnp.mean(kept_btk.astype(jnp.float32)))
    aux = {
        'aux_loss': cfg.load_balance_weight * load_balance + cfg.router_z_weight * z_loss,
        'load_balance_loss': load_balance,
        'router_z_loss': z_loss,
        'dropped_fraction': dropped,
        'router_entropy': entropy,
        'expert_load_min': jnp.min(load_e),
        'expert_load_max': jnp.max(load_e),
    }
    return {name: aux[name].astype(jnp.float32) for name in AUX_KEYS}
