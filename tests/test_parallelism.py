"""Every parallelism layout computes what one device computes, and stores what it should.

For each mesh (fsdp x tensor, pure fsdp, tensor with the sequence sharded over `tensor`,
data x fsdp) one optimiser step of train.step.train_step on the 8-device CPU mesh is compared
with the same step on a 1-device mesh: loss, gradients (accumulate over 2 micro-batches),
the updated params and Adam moments. Then the per-device shard shapes of params and of the
moments mu / nu are checked against a table written out by hand, so a rule that silently
replicates (or shards the wrong dimension) fails.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from model.sharding import logical_to_spec, make_rules, use_rules
from tests.util import mesh, packed_batch, tiny_cfg
from train import optimizer as optimizer_lib
from train import state as state_lib
from train import step as step_lib
from train.config import defaults

CFG = tiny_cfg(vocab_size=128, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
               mlp_dim=64, remat='attn_proj')
ACCUM, MICRO, T = 2, 8, 16

# Per-device shapes: L=2 layers, d=32, n=4 heads, k=2 kv heads, h=8, f=64, v=128.
SHARD_SHAPES = {
    'fsdp4_tensor2': {
        'embed/table_vd': (64, 8), 'head_dv': (8, 64), 'layers/attn/q_dnh': (2, 8, 2, 8),
        'layers/attn/k_dkh': (2, 8, 1, 8), 'layers/attn/o_nhd': (2, 2, 8, 8),
        'layers/mlp/gate_df': (2, 8, 32), 'layers/mlp/down_fd': (2, 32, 8),
        'layers/attn_norm/scale': (2, 32), 'final_norm/scale': (32,)},
    'fsdp8': {
        'embed/table_vd': (128, 4), 'head_dv': (4, 128), 'layers/attn/q_dnh': (2, 4, 4, 8),
        'layers/attn/k_dkh': (2, 4, 2, 8), 'layers/attn/o_nhd': (2, 4, 8, 4),
        'layers/mlp/gate_df': (2, 4, 64), 'layers/mlp/down_fd': (2, 64, 4),
        'layers/attn_norm/scale': (2, 32), 'final_norm/scale': (32,)},
    'tensor2_length': {
        'embed/table_vd': (64, 32), 'head_dv': (32, 64), 'layers/attn/q_dnh': (2, 32, 2, 8),
        'layers/attn/k_dkh': (2, 32, 1, 8), 'layers/attn/o_nhd': (2, 2, 8, 32),
        'layers/mlp/gate_df': (2, 32, 32), 'layers/mlp/down_fd': (2, 32, 32),
        'layers/attn_norm/scale': (2, 32), 'final_norm/scale': (32,)},
    'data2_fsdp4': {
        'embed/table_vd': (128, 8), 'head_dv': (8, 128), 'layers/attn/q_dnh': (2, 8, 4, 8),
        'layers/attn/k_dkh': (2, 8, 2, 8), 'layers/attn/o_nhd': (2, 4, 8, 8),
        'layers/mlp/gate_df': (2, 8, 64), 'layers/mlp/down_fd': (2, 64, 8),
        'layers/attn_norm/scale': (2, 32), 'final_norm/scale': (32,)},
}
LAYOUTS = {  # name: (mesh sizes, sharding rule overrides)
    'fsdp4_tensor2': (dict(fsdp=4, tensor=2), {}),
    'fsdp8': (dict(fsdp=8), {}),
    'tensor2_length': (dict(tensor=2), {'length': 'tensor'}),
    'data2_fsdp4': (dict(data=2, fsdp=4), {}),
}


def _batch():
  b = packed_batch(ACCUM * MICRO, T, CFG.vocab_size, seed=3)
  return {k: v.reshape(ACCUM, MICRO, T) for k, v in b.items()}


def _run(mesh_, rules, with_grads=False):
  """(new_state, metrics, grads or None) of one train step on `mesh_`."""
  tx = optimizer_lib.make(_optim(), 10)
  schedule = optimizer_lib.schedule(_optim(), 10)
  with jax.set_mesh(mesh_), use_rules(rules):
    state, shardings, mdef = state_lib.create(CFG, tx, mesh_, seed=0)
    batch_sharding = NamedSharding(mesh_, logical_to_spec((None, 'batch', 'length'), rules=rules))
    batch = jax.device_put(_batch(), batch_sharding)
    grads = None
    if with_grads:
      grads_fn = jax.jit(lambda p, b: step_lib.accumulate(step_lib.lm_loss(mdef), p, b, None))
      grads, count, _ = grads_fn(state['params'], batch)
      grads = jax.tree.map(lambda g: g / count, grads)
    step = step_lib.jit_step(lambda _: step_lib.lm_loss(mdef), tx, schedule, shardings,
                             batch_sharding)
    new_state, metrics = step(state, batch, None)
    return new_state, metrics, grads


def _optim():
  c = defaults().optim
  c.update(peak_lr=1e-2, warmup_steps=0, clip_norm=0.0)  # No clipping: mu = (1 - b1) * grad.
  return c


@pytest.fixture(scope='module')
def reference():
  return _run(mesh(), make_rules(), with_grads=True)


def _diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _by_path(tree) -> dict:
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): x
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _moments(opt_state, name: str):
  """The pure-dict tree of Adam's `mu` or `nu` inside the chained optax state."""
  found = []

  def visit(node):
    if hasattr(node, '_fields'):
      if name in node._fields:
        found.append(getattr(node, name))
      for child in node:
        visit(child)
    elif isinstance(node, (tuple, list)):
      for child in node:
        visit(child)
  visit(opt_state)
  assert len(found) == 1, (name, len(found))
  return found[0]


def _shard_shapes(tree) -> dict:
  out = {}
  for path, x in _by_path(tree).items():
    shapes = {s.data.shape for s in x.addressable_shards}
    assert len(shapes) == 1, (path, shapes)
    out[path] = shapes.pop()
  return out


@pytest.mark.parametrize('name', list(LAYOUTS))
def test_layout_matches_one_device(name, reference):
  sizes, overrides = LAYOUTS[name]
  state, metrics, _ = _run(mesh(**sizes), make_rules(overrides))
  ref_state, ref_metrics, ref_grads = reference
  for key in ('loss', 'grad_norm', 'param_norm', 'tokens'):
    assert abs(float(metrics[key]) - float(ref_metrics[key])) < 1e-5, key
  # After one step from zero moments, mu = (1 - b1) * grad and nu = (1 - b2) * grad^2: the
  # layout's gradients are these, gathered, compared with plain jax.grad on one device.
  mu, nu = _moments(state['opt_state'], 'mu'), _moments(state['opt_state'], 'nu')
  b1, b2 = _optim().b1, _optim().b2
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_grads))
  assert _diff(jax.tree.map(lambda m: m / (1 - b1), mu), ref_grads) < 1e-5 * max(scale, 1.0)
  assert _diff(nu, jax.tree.map(lambda g: (1 - b2) * g * g, ref_grads)) < 1e-7 * max(scale, 1.0) ** 2
  assert _diff(state['params'], ref_state['params']) < 1e-5
  assert _diff(mu, _moments(ref_state['opt_state'], 'mu')) < 1e-6
  # What each device holds: params and both Adam moments split as the table says.
  want = SHARD_SHAPES[name]
  params_shapes = _shard_shapes(state['params'])
  assert {k: params_shapes[k] for k in want} == want
  assert _shard_shapes(mu) == params_shapes and _shard_shapes(nu) == params_shapes


def test_length_rule_shards_activations_over_the_sequence():
  """With `length: tensor` the logits leave the model split along t, not along the vocabulary."""
  m = mesh(tensor=2)
  rules = make_rules({'length': 'tensor'})
  mdef, _ = state_lib.model_def(CFG)
  params = state_lib.init_params(CFG, jax.random.PRNGKey(0))
  b = packed_batch(2, T, CFG.vocab_size)
  fn = jax.jit(lambda p, x, pos, seg: mdef.build(p)(x, pos, seg)[0])
  with jax.set_mesh(m):
    with use_rules(rules):
      logits = fn(params, b['inputs'], b['positions'], b['segment_ids'])
    assert logits.sharding.is_equivalent_to(NamedSharding(m, PartitionSpec(None, 'tensor')), 3)
    assert {s.data.shape for s in logits.addressable_shards} == {(2, T // 2, CFG.vocab_size)}
    with use_rules(make_rules()):  # Default rules: tensor parallel over the vocabulary instead.
      logits = jax.jit(lambda p, x, pos, seg: mdef.build(p)(x, pos, seg)[0])(
          params, b['inputs'], b['positions'], b['segment_ids'])
    assert logits.sharding.is_equivalent_to(NamedSharding(m, PartitionSpec(None, None, 'tensor')), 3)


def test_optimizer_state_in_pinned_host_memory_updates_like_device_memory():
  """jax 0.10.2 supports `memory_kind='pinned_host'` shardings on CPU: Adam moments kept there
  (moved to the device for the update inside jit) give the update of device-resident moments."""
  m = mesh(fsdp=8)
  tx = optax.adam(1e-2)
  params = state_lib.init_params(CFG, jax.random.PRNGKey(0))
  mdef, abstract = state_lib.model_def(CFG)
  dev = state_lib.param_shardings(mdef, abstract, m)
  host = jax.tree.map(lambda s: s.with_memory_kind('pinned_host'), dev)
  params = jax.device_put(params, dev)
  grads = jax.tree.map(lambda p: jnp.cos(p) * 1e-2, params)
  opt = tx.init(params)
  mu_host = jax.device_put(opt[0].mu, host)
  assert {x.sharding.memory_kind for x in jax.tree.leaves(mu_host)} == {'pinned_host'}

  def update(grads, mu, nu, count, params, to_device):
    if to_device:
      mu, nu = jax.device_put(mu, dev), jax.device_put(nu, dev)
    state = (optax.ScaleByAdamState(count=count, mu=mu, nu=nu), optax.EmptyState())
    updates, (adam, _) = tx.update(grads, state, params)
    mu, nu = adam.mu, adam.nu
    if to_device:
      mu, nu = jax.device_put(mu, host), jax.device_put(nu, host)
    return optax.apply_updates(params, updates), mu, nu

  a = opt[0]
  with jax.set_mesh(m):
    p_dev, mu_dev, _ = jax.jit(functools.partial(update, to_device=False))(
        grads, a.mu, a.nu, a.count, params)
    p_host, mu_off, nu_off = jax.jit(functools.partial(update, to_device=True),
                                     out_shardings=(dev, host, host))(
        grads, mu_host, jax.device_put(a.nu, host), a.count, params)
  assert {x.sharding.memory_kind for x in jax.tree.leaves((mu_off, nu_off))} == {'pinned_host'}
  assert _diff(p_host, p_dev) == 0.0 and _diff(mu_off, mu_dev) == 0.0
  assert _diff(p_host, params) > 1e-3  # The update did something.


def test_attn_proj_remat_saves_only_attention_projections():
  """remat='attn_proj' keeps exactly the four named matmul outputs of attention (q, k, v
  projections and the output projection) besides the block input; 'full' keeps only the input.
  (Equality of the remat'ed model with the plain one: tests/test_model.py and the layouts above,
  which all run with remat='attn_proj'.)"""
  from flax import nnx
  from jax._src.ad_checkpoint import saved_residuals

  from model.transformer import REMAT_POLICIES, Block
  b, t = 2, T
  graphdef, params = nnx.split(Block(CFG, nnx.Rngs(0)))

  def block(params, x_btd):
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    return jnp.sum(nnx.merge(graphdef, params)(x_btd, positions, jnp.ones((b, t), jnp.int32))[0])

  def kept(policy):
    residuals = saved_residuals(jax.checkpoint(block, policy=REMAT_POLICIES[policy]), params,
                                jnp.ones((b, t, CFG.d_model)))
    return sorted(source.split("'")[1] if source.startswith('named') else source
                  for _, source in residuals if 'argument params' not in source)

  assert kept('attn_proj') == sorted(['from the argument x_btd', 'attn_out', 'k_proj', 'q_proj',
                                      'v_proj'])
  assert kept('full') == ['from the argument x_btd']
