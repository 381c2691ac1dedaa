"""Analytic per-device memory of one training step from mesh sizes, sharding rules, dtypes and the
remat policy; nothing is allocated (`jax.eval_shape`, `logical_to_spec` on Placement.abstract).

    persistent   params + AdamW mu and nu + the gradient accumulator (param_dtype; twice
                 with grad_accum > 1: a micro-batch's gradients are added into it)
    activations  what the forward pass keeps for the backward pass, for every layer, under
                 `model.remat` (RESIDUALS below), for one micro-batch
    transient    the largest working set on top of that, the max of three phases:
                   head: one chunk's f32 logits, softmax and gradient (train/head_loss.py),
                         the f32 dW accumulator and dh, the output head's weights (below);
                   layer: one layer's weights (below), the layer's intermediates recomputed
                         (remat) and their gradients, the attention's working memory;
                   embed: the gathered input table and its full f32 gradient (a scatter-add).
                 Weights of a group, once gathered over `fsdp`: the part that is not this
                 device's own shard (in param_dtype), as much again for its full gradient
                 before the reduce-scatter, and a compute-dtype copy of the whole.
"""

import dataclasses
import math

import jax
import numpy as np

from model.config import ModelConfig
from model.moe import capacity
from model.sharding import logical_to_spec, spec_axes
from model.transformer import CACHE_AXES, Decoder
from train import context as context_lib
from train.config import model_config
from train.head_loss import chunk_len
from train.state import model_def

GIB = 1024 ** 3
TOLERANCE = 0.35  # tests/test_plan.py: |analytic - XLA's plan (train/aot.py)| / XLA's plan.


@dataclasses.dataclass(frozen=True)
class Memory:
  """Bytes per device."""
  params: float
  optimizer: float
  grads: float
  activations: float
  transient: float
  transient_phase: str  # Which phase is the peak: 'head', 'layer' or 'embed'.
  batch: float

  @property
  def total(self) -> float:
    return (self.params + self.optimizer + self.grads + self.activations + self.transient
            + self.batch)


class Shapes:
  """Per-device element counts of logical tensors under a Placement (mesh + rules)."""

  def __init__(self, placement: context_lib.Placement):
    self.mesh, self.rules = placement.mesh, placement.rules

  def split(self, axes, shape, gathered=()) -> int:
    """How many ways a tensor of `shape` with logical `axes` is split (but for `gathered`)."""
    spec = logical_to_spec(axes, shape, self.mesh, self.rules)
    return math.prod(self.mesh.shape[a] for entry in spec for a in spec_axes(entry)
                     if a not in gathered)

  def local(self, axes, shape, gathered=()) -> int:
    """Elements per device (once the `gathered` mesh axes' splits are all-gathered)."""
    return math.prod(shape) // self.split(axes, shape, gathered)


# Tensors saved per layer for the backward pass, in units of `_layer_intermediates`, by remat
# policy (model/transformer.py REMAT_POLICIES), as JAX's `saved_residuals` lists them for a
# Block (tests/test_plan.py checks the bytes); x, the layer loop's carry, is always saved.
RESIDUALS = {
    'full': {'x': 1},
    'attn_proj': {'x': 2, 'q': 1, 'kv': 2},  # x, attn_out (d wide), q_proj, k_proj, v_proj.
    'dots_no_batch': {'x': 2, 'q': 1, 'kv': 2, 'mlp': 2},  # x, q, k, v, attn out, gate, up.
    'dots': {'x': 2, 'q': 2, 'kv': 2, 'mlp': 2, 'scores': 1},  # + attention's scores and p.v.
}


def _layer_intermediates(cfg: ModelConfig, s: Shapes, micro: int, seq: int) -> dict:
  """Per-device bytes of one layer's activations (forward intermediates), by kind."""
  c = cfg.dtype.itemsize
  b, t, d, n, k, h = micro, seq, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
  per_unit = cfg.layers_per_unit
  dense_blocks = per_unit - 1 if cfg.is_moe else 1
  mlp = s.local(('batch', 'length', 'act_mlp'), (b, t, cfg.mlp_dim)) * c
  scores = s.local(('batch', 'act_heads', 'length', None), (b, n, t, t)) * 4  # [b, n, t, s].
  return {
      'x': s.local(('batch', 'length', 'act_embed'), (b, t, d)) * c,
      'x32': s.local(('batch', 'length', 'act_embed'), (b, t, d)) * 4,  # RMSNorm in float32.
      'q': s.local(('batch', 'length', 'act_heads', None), (b, t, n, h)) * c,
      'kv': s.local(('batch', 'length', 'act_kv_heads', None), (b, t, k, h)) * c,
      'mlp': dense_blocks / per_unit * mlp,
      'moe': _moe_intermediates(cfg, s, b, t) / per_unit if cfg.is_moe else 0,
      'scores': scores if cfg.attention in ('xla', 'reference') else 0,  # When materialised.
  }


def _moe_intermediates(cfg: ModelConfig, s: Shapes, b: int, t: int) -> float:
  """Bytes of one MoE block's token buffers (dispatch-dependent), per device."""
  c, d, e, kk = cfg.dtype.itemsize, cfg.d_model, cfg.num_experts, cfg.experts_per_token
  f = cfg.expert_mlp_dim
  tokens = s.local(('batch', 'length', None), (b, t, 1))  # Local b * t.
  router = tokens * e * 4 * 3  # float32 logits, probabilities, log-probabilities.
  f_local = f // s.split(('expert_mlp',), (f,))
  if cfg.dispatch == 'dropless':
    # model/moe.py sorts each device's own [b t k] assignments inside shard_map ([rows, d] in and
    # out, [rows, f] hidden x3) with the experts' weights gathered whole but for the MLP width.
    rows = tokens * kk
    gathered = 3 * e * d * f_local * c
    return router + rows * (2 * d + 3 * f_local) * c + gathered
  b_local = s.local(('batch',), (b,))
  t_local = tokens // max(b_local, 1)
  slots = e * capacity(cfg, t_local) * b_local // s.split(('act_expert',), (e,))
  return router + slots * (2 * d + 3 * f_local) * c + tokens * kk * d * c


def _attention_transient(cfg: ModelConfig, s: Shapes, b: int, t: int) -> float:
  """Working memory of one layer's attention beyond q, k, v and its output."""
  n = cfg.num_heads
  if cfg.attention in ('xla', 'reference'):  # Scores, probabilities and their gradient.
    return 3 * s.local(('batch', 'act_heads', 'length', None), (b, n, t, t)) * 4
  if cfg.attention in ('cudnn', 'auto'):  # The [b, 1, t, s] mask as bool and as an additive bias.
    return s.local(('batch', 'length', None), (b, t, t)) * (1 + cfg.dtype.itemsize)
  block = min(cfg.attention_chunk, t)  # chunked / splash: one block of scores at a time.
  return 4 * s.local(('batch', 'act_heads', None, None), (b, n, block, block)) * 4


def estimate(config, mesh_sizes: dict, cfg: ModelConfig | None = None,
             model_cls=Decoder) -> Memory:
  """Analytic per-device memory of a train step of `config` on a mesh of `mesh_sizes` (axis -> size,
  default 1); `model_cls`: Decoder, or model/heads.py ScalarModel (head phase as the Decoder's)."""
  cfg = model_config(config) if cfg is None else cfg
  s = Shapes(context_lib.Placement.abstract(config, mesh_sizes))
  w, c = cfg.weight_dtype.itemsize, cfg.dtype.itemsize
  t = config.train
  micro, seq = t.global_batch // t.grad_accum, config.data.seq_len

  # Per group (one layer unit, the output head, the input table): elements once gathered for
  # compute, and how many of those are not this device's own shard (the all-gathered extra).
  params = 0
  groups = {'layer': [0, 0], 'head': [0, 0], 'embed': [0, 0]}
  mdef, abstract = model_def(cfg, model_cls)
  leaf_axes = jax.tree_util.tree_leaves(mdef.axes, is_leaf=lambda x: isinstance(x, tuple))
  for axes, leaf in zip(leaf_axes, jax.tree_util.tree_leaves(abstract)):
    local, gathered = s.local(axes, leaf.shape), s.local(axes, leaf.shape, ('fsdp', 'data'))
    params += local * w
    group = ('layer' if axes[0] == 'layers' else 'embed' if axes == ('vocab', 'embed')
             else 'head' if axes == ('embed', 'vocab') else None)
    if group:
      per = cfg.num_units if group == 'layer' else 1
      groups[group][0] += gathered // per
      groups[group][1] += (gathered - local) // per
  if cfg.tie_embeddings:
    groups['head'] = groups['embed']
  grads = params * (2 if t.grad_accum > 1 else 1)

  inter = _layer_intermediates(cfg, s, micro, seq)
  if cfg.remat == 'none':
    saved = _all_saved(inter)
  else:
    saved = sum(inter[kind] * count for kind, count in RESIDUALS[cfg.remat].items())
    if cfg.is_moe and cfg.remat in ('dots', 'dots_no_batch'):  # The expert matmuls' outputs.
      saved += inter['moe']
  activations = cfg.num_layers * saved

  # train/head_loss.py: one chunk's f32 logits, softmax and gradient, the f32 dW and dh.
  b_local = s.local(('batch',), (micro,))
  t_local = s.local(('batch', 'length'), (micro, seq)) // max(b_local, 1)
  chunk = b_local * chunk_len(b_local, t_local)
  logits = s.local((None, 'act_vocab'), (chunk, cfg.vocab_size))
  copy = c if c != w else 0  # A compute-dtype copy of gathered weights, unless it is the same.

  def weights(group):  # The all-gathered f32 extra, its full f32 gradient, the compute copy.
    gathered, extra = groups[group]
    return extra * 2 * w + gathered * copy

  gathered_head, extra_head = groups['head']
  head = (logits * (3 * 4 + c) + weights('head') + (gathered_head - extra_head) * 4
          + b_local * t_local * cfg.d_model * 4)
  backward = _all_saved(inter, scores=False)  # One layer's activation gradients.
  recompute = 0 if cfg.remat == 'none' else backward
  layer = weights('layer') + recompute + backward + _attention_transient(cfg, s, micro, seq)
  phases = {'head': head, 'layer': layer, 'embed': groups['embed'][1] * 2 * w}
  phase = max(phases, key=phases.get)
  batch_bytes = 5 * 4 * s.local((None, 'batch', 'length'), (t.grad_accum, micro, seq))
  return Memory(params=params, optimizer=2 * params, grads=grads, activations=activations,
                transient=phases[phase], transient_phase=phase, batch=batch_bytes)


def kv_cache(config, mesh_sizes: dict, cfg: ModelConfig, slots: int, length: int) -> float:
  """Per-device bytes of k and v of a decoding cache (model/transformer.py init_cache) of `slots`
  rows of `length` columns in the compute dtype, split by CACHE_AXES under the config's rules."""
  s = Shapes(context_lib.Placement.abstract(config, mesh_sizes))
  shape = (cfg.num_units, cfg.layers_per_unit, slots, length, cfg.num_kv_heads, cfg.dim_per_head)
  return 2 * s.local(CACHE_AXES, shape) * cfg.dtype.itemsize


def _all_saved(inter: dict, scores: bool = True) -> float:
  """What one Block keeps without remat: 4 d-wide x (input, norm outputs, attention output,
  residual sum) and the f32 norm statistics, q, k (pre/post rope), v and o, the scores and
  probabilities if materialised, and the MLP's gate, up, sigmoid, silu and product."""
  return (4 * inter['x'] + inter['x32'] + 3 * inter['q'] + 3 * inter['kv']
          + (2 * inter['scores'] if scores else 0)
          + 5 * inter['mlp'] + inter['moe'])


def gib(x: float) -> float:
  return float(np.round(x / GIB, 2))
