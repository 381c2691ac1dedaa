"""Decoder-only transformer: pre-norm blocks of GQA attention and a SwiGLU (or MoE) MLP.

Every block parameter has a leading `layers` axis (stacked units), scanned (`cfg.scan_layers`)
or unrolled, with the same parameter tree. With `cfg.moe_every = m > 1` the stacked unit is m
layers whose last is MoE; otherwise one block.

KV cache (for model/decode.py). `init_cache(cfg, b, s)` gives
  k, v          [units, blocks per unit, b, s, kv_heads, h]: kv heads, never repeated to n heads;
  segment_ids   [b, s]: 1 for a filled slot, 0 for an empty slot or padding;
  positions     [b, s]: the absolute position of the token in each slot.
`Decoder.extend(tokens_bt, positions_bt, segment_ids_bt, cache, index)` writes the t new tokens
into slots [index, index + t) of every layer (`index`: a scalar, or int32 [b], one per row) and
attends over the whole cache with model/attention.py's mask, so empty slots are invisible; same
parameters and layer functions as the forward.
"""

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
from flax import nnx

from model import attention as attention_lib
from model.config import ModelConfig
from model.layers import RMSNorm, Embed, SwiGLU, param, rope
from model.moe import MoeBlock
from model.sharding import constrain

REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    'attn_proj': jax.checkpoint_policies.save_only_these_names('q_proj', 'k_proj', 'v_proj',
                                                               'attn_out'),
}


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, n, k, h, w = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head, cfg.weight_dtype
    self.cfg = cfg
    self.q_dnh = param(rngs, (d, n, h), ('embed', 'heads', 'head_dim'), w)
    self.k_dkh = param(rngs, (d, k, h), ('embed', 'kv_heads', 'head_dim'), w)
    self.v_dkh = param(rngs, (d, k, h), ('embed', 'kv_heads', 'head_dim'), w)
    self.o_nhd = param(rngs, (n, h, d), ('heads', 'head_dim', 'embed'), w, fan_in=n * h)

  def project_qkv(self, x_btd, positions_bt):
    dt, name = self.cfg.dtype, checkpoint_name
    q_btnh = name(jnp.einsum('btd,dnh->btnh', x_btd, self.q_dnh[...].astype(dt)), 'q_proj')
    k_btkh = name(jnp.einsum('btd,dkh->btkh', x_btd, self.k_dkh[...].astype(dt)), 'k_proj')
    v_btkh = name(jnp.einsum('btd,dkh->btkh', x_btd, self.v_dkh[...].astype(dt)), 'v_proj')
    q_btnh = constrain(rope(q_btnh, positions_bt, self.cfg.rope_theta),
                       ('batch', 'length', 'act_heads', None))
    k_btkh = constrain(rope(k_btkh, positions_bt, self.cfg.rope_theta),
                       ('batch', 'length', 'act_kv_heads', None))
    v_btkh = constrain(v_btkh, ('batch', 'length', 'act_kv_heads', None))
    return q_btnh, k_btkh, v_btkh

  def output(self, o_btnh):
    out_btd = jnp.einsum('btnh,nhd->btd', o_btnh, self.o_nhd[...].astype(self.cfg.dtype))
    return checkpoint_name(out_btd, 'attn_out')

  def __call__(self, x_btd, positions_bt, segment_ids_bt):
    q_btnh, k_btkh, v_btkh = self.project_qkv(x_btd, positions_bt)
    o_btnh = attention_lib.attention(
        q_btnh, k_btkh, v_btkh, q_segment_ids_bt=segment_ids_bt, kv_segment_ids_bs=segment_ids_bt,
        q_positions_bt=positions_bt, kv_positions_bs=positions_bt,
        implementation=self.cfg.attention, chunk_size=self.cfg.attention_chunk)
    return self.output(o_btnh)

  def extend(self, x_btd, positions_bt, segment_ids_bt, kv):
    """Attention of t new tokens over a cache layer; returns (out_btd, k_btkh, v_btkh) where the
    new keys/values are for the caller to store (the layer's cache is only read here)."""
    k_bskh, v_bskh, kv_segment_ids_bs, kv_positions_bs, index = kv
    q_btnh, k_btkh, v_btkh = self.project_qkv(x_btd, positions_bt)
    k_btkh, v_btkh = k_btkh.astype(k_bskh.dtype), v_btkh.astype(v_bskh.dtype)
    k_bskh, v_bskh = write_slots(k_bskh, k_btkh, index), write_slots(v_bskh, v_btkh, index)
    # Cached calls (t != s) have no fused kernel: 'xla', or 'reference' if asked.
    implementation = 'reference' if self.cfg.attention == 'reference' else 'xla'
    o_btnh = attention_lib.attention(
        q_btnh, k_bskh.astype(q_btnh.dtype), v_bskh.astype(q_btnh.dtype),
        q_segment_ids_bt=segment_ids_bt, kv_segment_ids_bs=kv_segment_ids_bs,
        q_positions_bt=positions_bt, kv_positions_bs=kv_positions_bs,
        implementation=implementation, chunk_size=self.cfg.attention_chunk)
    return self.output(o_btnh), k_btkh, v_btkh


class Block(nnx.Module):
  """x + attn(norm(x)), then x + mlp(norm(x)); the MLP is a MoeBlock when `moe`."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, moe: bool = False):
    self.moe = moe
    self.attn_norm = RMSNorm(cfg.d_model, cfg, rngs)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg, rngs)
    self.mlp = MoeBlock(cfg, rngs) if moe else SwiGLU(cfg, rngs)

  def __call__(self, x_btd, positions_bt, segment_ids_bt, rng=None):
    x_btd = x_btd + self.attn(self.attn_norm(x_btd), positions_bt, segment_ids_bt)
    return self._mlp_residual(x_btd, rng)

  def _mlp_residual(self, x_btd, rng):
    h_btd, aux = self.mlp_norm(x_btd), {}
    if self.moe:
      h_btd, aux = self.mlp(h_btd, rngs=None if rng is None else nnx.Rngs(rng),
                            deterministic=rng is None)
    else:
      h_btd = self.mlp(h_btd)
    return constrain(x_btd + h_btd, ('batch', 'length', 'act_embed')), aux

  def extend(self, x_btd, positions_bt, segment_ids_bt, kv):
    """The block over t new tokens with a cache layer (see Attention.extend); no router noise."""
    out_btd, k_btkh, v_btkh = self.attn.extend(self.attn_norm(x_btd), positions_bt,
                                               segment_ids_bt, kv)
    x_btd, _ = self._mlp_residual(x_btd + out_btd, None)
    return x_btd, k_btkh, v_btkh

  def blocks(self):
    return (self,)


class Unit(nnx.Module):
  """`moe_every` consecutive layers, the last one MoE: the repeated (stacked) piece."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.size = cfg.layers_per_unit
    for i in range(self.size):
      setattr(self, f'block{i}', Block(cfg, rngs, moe=cfg.is_moe and i == self.size - 1))

  def blocks(self):
    return tuple(getattr(self, f'block{i}') for i in range(self.size))

  def __call__(self, x_btd, positions_bt, segment_ids_bt, rng=None):
    aux = {}
    for block in self.blocks():
      x_btd, block_aux = block(x_btd, positions_bt, segment_ids_bt, rng)
      aux = aux or block_aux
    return x_btd, aux


def write_slots(x, new, index, batch_axis=0):
  """`new` written into `x` from slot `index` of the axis after `batch_axis` (every other axis
  from 0): one slot for every row (a dynamic_update_slice), or int32 [b], a slot per row (one
  scatter of [.., b, t] index tuples: a vmapped update is a much slower scatter on CPU)."""
  if jnp.ndim(index) == 0:
    return jax.lax.dynamic_update_slice(x, new, (0,) * (batch_axis + 1) + (index,) +
                                        (0,) * (x.ndim - batch_axis - 2))
  idx = jnp.ix_(*(jnp.arange(n) for n in new.shape[:batch_axis + 2]))
  return x.at[(*idx[:-1], idx[-1] + index.reshape(idx[-2].shape))].set(new)


# Logical axes of the cache's k and v: [units, blocks per unit, b, s, kv heads, h].
CACHE_AXES = (None, None, 'batch', None, 'act_kv_heads', None)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> dict:
  """An empty cache of `length` slots (module docstring); k/v in `dtype` (default cfg.dtype)."""
  shape = (cfg.num_units, cfg.layers_per_unit, batch, length, cfg.num_kv_heads, cfg.dim_per_head)
  dtype = cfg.dtype if dtype is None else dtype
  zeros = lambda: constrain(jnp.zeros(shape, dtype), CACHE_AXES)
  return {'k': zeros(), 'v': zeros(), 'segment_ids': jnp.zeros((batch, length), jnp.int32),
          'positions': jnp.zeros((batch, length), jnp.int32)}


def _stacked_units(cfg: ModelConfig, rngs: nnx.Rngs):
  @nnx.split_rngs(splits=cfg.num_units)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return Unit(cfg, rngs) if cfg.layers_per_unit > 1 else Block(cfg, rngs, moe=cfg.is_moe)

  units = create(rngs)
  for _, var in nnx.iter_graph(units):  # Stacked: a leading 'layers' axis on every parameter.
    if isinstance(var, nnx.Variable):
      var.set_metadata('axes', ('layers',) + tuple(var.get_metadata()['axes']))
  return units, cfg.num_units


class Decoder(nnx.Module):
  """tokens [b, t] (+ positions, segment ids) -> float32 logits [b, t, v] and an aux dict: empty
  when dense; for MoE the router statistics averaged over MoE layers and `aux_loss` (weighted,
  summed over layers) to add to the loss."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embed(cfg, rngs)
    self.layers, self.num_units = _stacked_units(cfg, rngs)
    self.final_norm = RMSNorm(cfg.d_model, cfg, rngs)
    if not cfg.tie_embeddings:
      self.head_dv = param(rngs, (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'), cfg.weight_dtype)

  def hidden(self, tokens_bt, positions_bt=None, segment_ids_bt=None, rng=None):
    """Final-normed hidden states [b, t, d] (reward and value heads read these)."""
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1], dtype=jnp.int32), tokens_bt.shape)
    if segment_ids_bt is None:
      segment_ids_bt = jnp.ones_like(tokens_bt, dtype=jnp.int32)
    x_btd = self.embed(tokens_bt)
    graphdef, state = nnx.split(self.layers)

    def body(x_btd, xs):
      unit_state, unit_rng = xs
      unit = nnx.merge(graphdef, unit_state)
      return unit(x_btd, positions_bt, segment_ids_bt, unit_rng)

    if self.cfg.remat != 'none':
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.cfg.remat],
                            prevent_cse=not self.cfg.scan_layers)
    rngs = None if rng is None else jax.random.split(rng, self.num_units)
    x_btd, aux_l = self._over_units(body, x_btd, (state, rngs))
    aux = {k: (jnp.sum(v) if k == 'aux_loss' else jnp.mean(v)) for k, v in aux_l.items()}
    return self.final_norm(x_btd), aux

  def extend(self, tokens_bt, positions_bt, segment_ids_bt, cache, index):
    """t new tokens (a prefill, or t = 1 to decode) through the model with `cache` (module
    docstring); returns (final-normed h_btd, updated cache)."""
    b, s = cache['segment_ids'].shape
    if tokens_bt.shape[0] != b or tokens_bt.shape[1] > s:
      raise ValueError(f'model/transformer.py Decoder.extend: tokens {tokens_bt.shape} do not fit '
                       f'a cache of batch {b} and {s} slots')
    kv_segment_ids_bs = write_slots(cache['segment_ids'], segment_ids_bt.astype(jnp.int32), index)
    kv_positions_bs = write_slots(cache['positions'], positions_bt.astype(jnp.int32), index)
    x_btd = self.embed(tokens_bt)
    graphdef, state = nnx.split(self.layers)

    def body(x_btd, xs):  # The cache is only read in the scan: a carried one is copied per unit.
      unit_state, k_mbskh, v_mbskh = xs
      new_kv = []  # Per block of the unit: its new (k_btkh, v_btkh); stacked, [m, b, t, k, h].
      for i, block in enumerate(nnx.merge(graphdef, unit_state).blocks()):
        kv = (k_mbskh[i], v_mbskh[i], kv_segment_ids_bs, kv_positions_bs, index)
        x_btd, *new = block.extend(x_btd, positions_bt, segment_ids_bt, kv)
        new_kv.append(new)
      return x_btd, tuple(jnp.stack(a) for a in zip(*new_kv))

    x_btd, (k_umbtkh, v_umbtkh) = self._over_units(body, x_btd, (state, cache['k'], cache['v']))
    k_all = write_slots(cache['k'], k_umbtkh.astype(cache['k'].dtype), index, batch_axis=2)
    v_all = write_slots(cache['v'], v_umbtkh.astype(cache['v'].dtype), index, batch_axis=2)
    cache = {'k': constrain(k_all, CACHE_AXES), 'v': constrain(v_all, CACHE_AXES),
             'segment_ids': kv_segment_ids_bs, 'positions': kv_positions_bs}
    return self.final_norm(x_btd), cache

  def _over_units(self, body, carry, xs):
    """`lax.scan(body, carry, xs)` over the stacked units, or the same as a Python loop."""
    if self.cfg.scan_layers:
      return jax.lax.scan(body, carry, xs)
    ys = []
    for i in range(self.num_units):
      carry, y = body(carry, jax.tree.map(lambda a: a[i], xs))
      ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)

  def head_matrix(self):
    """[d, v] head in the compute dtype (tied: table_vd.T): logits(h) == h @ head_matrix()."""
    if self.cfg.tie_embeddings:
      return self.embed.table_vd[...].astype(self.cfg.dtype).T
    return self.head_dv[...].astype(self.cfg.dtype)

  def logits(self, h_btd):
    logits_btv = jnp.einsum('btd,dv->btv', h_btd, self.head_matrix())
    return constrain(logits_btv.astype(jnp.float32), ('batch', 'length', 'act_vocab'))

  def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None, rng=None):
    h_btd, aux = self.hidden(tokens_bt, positions_bt, segment_ids_bt, rng)
    return self.logits(h_btd), aux
