"""MoeBlock: dispatch implementations agree, capacity drops the right assignments, aux losses
match their closed forms, expert-sharded runs match unsharded ones, jitter only in training."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.config import ConfigError, ModelConfig
from model.moe import AUX_KEYS, MoeBlock, capacity
from model.sharding import named_sharding

D, F, E = 16, 32, 8


def tiny_cfg(**overrides) -> ModelConfig:
  base = dict(vocab_size=64, d_model=D, num_layers=2, num_heads=2, num_kv_heads=2, mlp_dim=F,
              num_experts=E, experts_per_token=2, capacity_factor=1.25, load_balance_weight=0.01,
              router_z_weight=0.001)
  return ModelConfig(**(base | overrides))


def make_block(cfg, seed=0):
  return MoeBlock(cfg, nnx.Rngs(seed))


@nnx.jit(static_argnames=('deterministic',))
def call(block, x_btd, rngs=None, deterministic=True):
  """block(x) compiled as one program (eager op-by-op dispatch is slow on the shared CPU)."""
  return block(x_btd, rngs=rngs, deterministic=deterministic)


@nnx.jit(static_argnames=('deterministic',))
def route(block, x_btd, rngs=None, deterministic=True):
  return block.route(x_btd, rngs=rngs, deterministic=deterministic)


def loss_fn(params, x_btd, graphdef, probe_btd):
  """A scalar that touches every output and every aux loss, for gradients."""
  y_btd, aux = nnx.merge(graphdef, params)(x_btd)
  return jnp.sum(y_btd * probe_btd) + aux['aux_loss'], (y_btd, aux)


def run(block, x_btd, probe_btd):
  graphdef, params = nnx.split(block)
  grad_fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True), static_argnums=2)
  (_, (y_btd, aux)), (g_params, g_x) = grad_fn(params, x_btd, graphdef, probe_btd)
  return y_btd, aux, g_params, g_x


def assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for la, lb in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(la), np.asarray(lb), rtol=rtol, atol=atol)


def inputs(b=2, t=8, seed=1):
  kx, kp = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, (b, t, D)), jax.random.normal(kp, (b, t, D))


# ---------------------------------------------------------------- dispatches agree


@pytest.mark.parametrize('k', [1, 2])
def test_dispatches_agree_outputs_and_grads(k):
  x_btd, probe_btd = inputs()
  no_drop = tiny_cfg(experts_per_token=k, capacity_factor=E / k)  # Makes capacity == t.
  assert capacity(no_drop, x_btd.shape[1]) == x_btd.shape[1]
  results = {d: run(make_block(dataclasses.replace(no_drop, dispatch=d)), x_btd, probe_btd)
             for d in ('capacity', 'dropless', 'reference')}
  ref_y, ref_aux, ref_gp, ref_gx = results['reference']
  assert float(jnp.max(jnp.abs(ref_y))) > 0.1  # Not trivially zero.
  for name in ('capacity', 'dropless'):
    y, aux, gp, gx = results[name]
    assert_trees_close(y, ref_y)
    assert_trees_close(gx, ref_gx)
    assert_trees_close(gp, ref_gp)
    assert set(aux) == set(AUX_KEYS)
    for key in AUX_KEYS:
      assert aux[key].shape == () and aux[key].dtype == jnp.float32, key
      np.testing.assert_allclose(aux[key], ref_aux[key], rtol=1e-6, atol=1e-7)
    assert float(aux['dropped_fraction']) == 0.0
  # The router gets a gradient through the top-k softmax weights (k > 1) and the aux losses.
  assert float(jnp.max(jnp.abs(ref_gp['router_de'][...]))) > 0


# ---------------------------------------------------------------- capacity drops

# Hand-built routing: E=3 experts, k=2, t=6 tokens; token i picks (top-1, top-2) = ROUTES[i].
ROUTES = [(0, 1), (1, 0), (1, 2), (0, 2), (1, 0), (2, 0)]


def routed_block(cfg, routes_bt2):
  """A block whose router logits are x[..., :E] (identity router), and x with top-1 logit 2,
  top-2 logit 1, others 0 in those coordinates (random elsewhere)."""
  block = make_block(cfg)
  e = cfg.num_experts
  router = np.zeros((cfg.d_model, e), np.float32)
  router[np.arange(e), np.arange(e)] = 1.0
  block.router_de[...] = jnp.asarray(router)
  shape = (len(routes_bt2), len(routes_bt2[0]), cfg.d_model)
  x = np.array(jax.random.normal(jax.random.key(3), shape))
  x[..., :e] = 0.0
  for b, row in enumerate(routes_bt2):
    for t, (first, second) in enumerate(row):
      x[b, t, first], x[b, t, second] = 2.0, 1.0
  return block, jnp.asarray(x)


def expert_np(block, i, x_d):
  gate, up, down = (np.asarray(v[...], np.float64)
                    for v in (block.gate_edf, block.up_edf, block.down_efd))
  g, u = x_d @ gate[i], x_d @ up[i]
  return (g / (1.0 + np.exp(-g)) * u) @ down[i]


# (capacity_factor, slots c, dropped (token, choice) in row 0, in row 1 = row 0 reversed).
# Row 0 with c=3: top-1 pass fills e0 {t0, t3}, e1 {t1, t2, t4}, e2 {t5}; top-2 pass: t0->e1 full,
# t1->e0 kept, t2->e2 kept, t3->e2 kept, t4->e0 full, t5->e0 full. With c=2 the top-1 pass
# already drops t4 (third top-1 of e1) and only t2's second choice (e2) still fits.
DROP_CASES = [
    (0.75, 3, {(0, 1), (4, 1), (5, 1)}, {(1, 1), (4, 1), (5, 1)}),
    (0.5, 2, {(4, 0), (0, 1), (1, 1), (3, 1), (4, 1), (5, 1)},
     {(4, 0), (0, 1), (1, 1), (3, 1), (4, 1), (5, 1)}),
]


@pytest.mark.parametrize('factor,slots,dropped_row0,dropped_row1', DROP_CASES)
def test_capacity_drops_expected_assignments(factor, slots, dropped_row0, dropped_row1):
  cfg = tiny_cfg(num_experts=3, d_model=8, mlp_dim=16, capacity_factor=factor)
  assert capacity(cfg, len(ROUTES)) == slots
  routes = [ROUTES, ROUTES[::-1]]
  block, x_btd = routed_block(cfg, routes)
  y_btd, aux = call(block, x_btd)
  _, experts_btk, weights_btk = route(block, x_btd)
  np.testing.assert_array_equal(experts_btk, np.array(routes))
  w = np.asarray(weights_btk, np.float64)
  x = np.asarray(x_btd, np.float64)
  expected = np.zeros_like(x)
  for b, dropped in enumerate([dropped_row0, dropped_row1]):
    for t in range(len(ROUTES)):
      for j in range(2):
        if (t, j) not in dropped:
          expected[b, t] += w[b, t, j] * expert_np(block, routes[b][t][j], x[b, t])
  np.testing.assert_allclose(np.asarray(y_btd), expected, rtol=1e-5, atol=1e-5)
  n_assign = 2 * len(ROUTES) * 2
  np.testing.assert_allclose(float(aux['dropped_fraction']),
                             (len(dropped_row0) + len(dropped_row1)) / n_assign, rtol=1e-6)
  # Nothing is dropped by the other dispatches, whatever the capacity factor.
  for name in ('dropless', 'reference'):
    other = make_block(dataclasses.replace(cfg, dispatch=name))
    nnx.update(other, nnx.state(block))
    y_other, aux_other = call(other, x_btd)
    assert float(aux_other['dropped_fraction']) == 0.0
    assert not np.allclose(y_other, y_btd)


# ---------------------------------------------------------------- aux losses


def logits_block(logits_bte, seed=0):
  """A 4-expert top-2 block whose router logits are exactly `logits_bte` (identity router)."""
  b, t, e = logits_bte.shape
  cfg = tiny_cfg(num_experts=e, d_model=8, mlp_dim=16)
  block = make_block(cfg, seed)
  block.router_de[...] = jnp.eye(8, e, dtype=jnp.float32)
  x = np.array(jax.random.normal(jax.random.key(seed), (b, t, 8)))
  x[..., :e] = logits_bte
  return block, jnp.asarray(x)


def closed_form_aux(logits_bte, k, lb_weight, z_weight):
  z = np.asarray(logits_bte, np.float64).reshape(-1, logits_bte.shape[-1])
  n, e = z.shape
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  top = np.argsort(-z, axis=-1, kind='stable')[:, :k]
  f = np.bincount(top.ravel(), minlength=e) / (n * k)
  lb = e * np.sum(f * p.mean(0))
  lse = np.log(np.sum(np.exp(z), -1))
  zl = np.mean(lse ** 2)
  return {'load_balance_loss': lb, 'router_z_loss': zl, 'aux_loss': lb_weight * lb + z_weight * zl,
          'router_entropy': np.mean(-np.sum(p * np.log(p), -1)), 'expert_load_min': f.min(),
          'expert_load_max': f.max(), 'dropped_fraction': 0.0}


def test_aux_matches_closed_form_on_random_routing():
  logits = np.array(jax.random.normal(jax.random.key(7), (2, 6, 4))) * 2.0
  block, x_btd = logits_block(logits)
  block.cfg = dataclasses.replace(block.cfg, capacity_factor=2.0)  # e / k: no drops.
  _, aux = call(block, x_btd)
  want = closed_form_aux(logits, 2, block.cfg.load_balance_weight, block.cfg.router_z_weight)
  for key, value in want.items():
    np.testing.assert_allclose(float(aux[key]), value, rtol=1e-5, atol=1e-7, err_msg=key)


def test_load_balance_is_one_when_balanced_and_e_over_k_when_collapsed():
  # Cyclic shifts of (3, 1, 0, 0): every expert is chosen twice (once top-1, once top-2) and the
  # mean router probability is uniform, so f = P = 1/4 and the loss is exactly 1.
  balanced = np.stack([np.roll([3.0, 1.0, 0.0, 0.0], s) for s in range(4)])[None]
  block, x_btd = logits_block(balanced)
  _, aux = call(block, x_btd)
  np.testing.assert_allclose(float(aux['load_balance_loss']), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(aux['expert_load_min']), 0.25, rtol=1e-6)
  np.testing.assert_allclose(float(aux['expert_load_max']), 0.25, rtol=1e-6)
  # Equal logits: P is uniform, so the loss is 1 whatever the (tie-broken) assignment.
  block, x_btd = logits_block(np.zeros((1, 4, 4)))
  _, aux = call(block, x_btd)
  np.testing.assert_allclose(float(aux['load_balance_loss']), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(aux['router_entropy']), np.log(4.0), rtol=1e-6)
  # Every token confidently on experts 0 and 1: f = (1/2, 1/2, 0, 0), P ~ f, loss ~ e / k = 2.
  collapsed = np.tile([12.0, 12.0, -12.0, -12.0], (1, 4, 1))
  block, x_btd = logits_block(collapsed)
  _, aux = call(block, x_btd)
  np.testing.assert_allclose(float(aux['load_balance_loss']), 2.0, rtol=1e-6)
  assert float(aux['expert_load_min']) == 0.0 and float(aux['expert_load_max']) == 0.5


# ---------------------------------------------------------------- expert parallelism


def put_params(block, mesh):
  """Device-put every parameter with the sharding its logical axes map to on `mesh`."""
  graphdef, params = nnx.split(block)
  shardings = jax.tree.map(lambda v: named_sharding(mesh, v.axes, v.shape), params,
                           is_leaf=lambda v: isinstance(v, nnx.Variable))
  return graphdef, jax.device_put(params, shardings)


def expert_local_shape(var, mesh_shape):
  """A parameter's shape as the FSDP all-gather leaves it: its `expert` dim still split over the
  expert devices and its `expert_mlp` dim over the tensor devices, the rest whole."""
  split = {'expert': mesh_shape[2], 'expert_mlp': mesh_shape[3]}
  return tuple(n // split.get(axis, 1) for n, axis in zip(var.shape, var.axes))


@pytest.mark.parametrize('dispatch', ['capacity', 'dropless'])
@pytest.mark.parametrize('mesh_shape,expert_shard', [((1, 2, 4, 1), (2, 8, 32)),
                                                     ((1, 1, 8, 1), (1, 16, 32)),
                                                     ((1, 2, 2, 2), (4, 8, 16))])
def test_sharded_matches_unsharded(dispatch, mesh_shape, expert_shard):
  cfg = tiny_cfg(dispatch=dispatch)
  x_btd, probe_btd = inputs(b=8, t=8)
  block = make_block(cfg)
  want_y, want_aux, want_gp, want_gx = run(block, x_btd, probe_btd)
  assert float(want_aux['dropped_fraction']) > 0 or dispatch == 'dropless'

  mesh = jax.make_mesh(mesh_shape, ('data', 'fsdp', 'expert', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)
  with jax.set_mesh(mesh):
    graphdef, params = put_params(block, mesh)
    for name in ('gate_edf', 'up_edf', 'down_efd'):
      shard_shapes = {s.data.shape for s in params[name][...].addressable_shards}
      want = (expert_shard if name != 'down_efd' else
              (expert_shard[0], expert_shard[2], D // mesh_shape[1]))
      assert shard_shapes == {want}, (name, shard_shapes)
    batch = named_sharding(mesh, ('batch', 'length', 'act_embed'), x_btd.shape)
    xs, ps = jax.device_put(x_btd, batch), jax.device_put(probe_btd, batch)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True), static_argnums=2)
    (_, (y, aux)), (gp, gx) = grad_fn(params, xs, graphdef, ps)
    if dispatch == 'capacity':
      # Tokens travel to their experts' devices by all-to-all; the only all-gathers are FSDP
      # gathers of parameters (over `fsdp`, expert dim still split), never of activations.
      hlo = grad_fn.lower(params, xs, graphdef, ps).compile().as_text()
      assert re.search(r' all-to-all(-start)?\(', hlo)
      variables = jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, nnx.Variable))
      fsdp_gathered = {expert_local_shape(v, mesh_shape) for v in variables}
      gathered = {tuple(int(n) for n in m.split(','))
                  for m in re.findall(r'= \w+\[([\d,]+)\]\S* all-gather(?:-start)?\(', hlo)}
      assert gathered <= fsdp_gathered, (gathered, fsdp_gathered)
    else:
      # Dropless sorts each device's own assignments (shard_map): every sort in the program
      # has at most the local b * t * k rows, never the global batch's.
      hlo = grad_fn.lower(params, xs, graphdef, ps).compile().as_text()
      local_rows = x_btd.shape[0] // (mesh_shape[0] * mesh_shape[1] * mesh_shape[2]) * 8 * 2
      sorted_rows = {int(m) for m in re.findall(r'= \(?s32\[(\d+)\][^=]*? sort\(', hlo)}
      assert sorted_rows and max(sorted_rows) <= local_rows, (sorted_rows, local_rows)
  assert_trees_close(y, want_y)
  assert_trees_close(gx, want_gx)
  assert_trees_close(gp, want_gp)
  for key in AUX_KEYS:
    np.testing.assert_allclose(aux[key], want_aux[key], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- jitter and errors


def test_router_jitter_only_when_not_deterministic():
  x_btd, _ = inputs(b=2, t=16)
  block = make_block(tiny_cfg(router_jitter=0.5))
  clean = route(block, x_btd)
  same = route(block, x_btd, nnx.Rngs(jitter=1), deterministic=True)
  noisy = route(block, x_btd, nnx.Rngs(jitter=1), deterministic=False)
  for a, b in zip(clean, same):
    np.testing.assert_array_equal(a, b)
  assert np.any(np.asarray(noisy[1]) != np.asarray(clean[1]))  # Some routing changed.
  y_clean, _ = call(block, x_btd)
  y_noisy, _ = call(block, x_btd, nnx.Rngs(jitter=1), deterministic=False)
  assert not np.allclose(y_clean, y_noisy)
  # Without jitter, training mode routes exactly like evaluation.
  block.cfg = dataclasses.replace(block.cfg, router_jitter=0.0)
  for a, b in zip(clean, route(block, x_btd, nnx.Rngs(jitter=1), deterministic=False)):
    np.testing.assert_array_equal(a, b)
  block.cfg = dataclasses.replace(block.cfg, router_jitter=0.5)
  with pytest.raises(ValueError, match='router_jitter'):
    block(x_btd, deterministic=False)


def test_bad_config_and_input_errors():
  with pytest.raises(ConfigError, match='num_experts'):
    MoeBlock(tiny_cfg(num_experts=0), nnx.Rngs(0))
  with pytest.raises(ConfigError, match='dispatch'):
    MoeBlock(tiny_cfg(dispatch='einsum'), nnx.Rngs(0))
  with pytest.raises(ValueError, match='d_model'):
    make_block(tiny_cfg())(jnp.zeros((2, 4, D + 1)))
