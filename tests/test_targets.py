"""Compile targets without the hardware: the real XLA:TPU compiler on abstract TPU devices
(train/targets.py, train/aot.py compile_for_target, train/plan.py --target), the TPU kernels
(splash, megablox gmm) in the Pallas interpreter under a CPU mesh, and HLO collective counts.

The TPU compiles need libtpu (the `.[tpu]` extra, which .ci/run installs)."""

import dataclasses
import importlib.util
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import attention as attn
from model import moe
from model.config import ConfigError
from model.sharding import make_rules, mesh_platform, use_rules
from tests.test_attention import packed, qkv, run
from tests.conftest import REPO as REPO_ROOT
from tests.util import mesh, tiny_cfg
from train import aot, hlo, plan, targets
from train import config as config_lib
from train import optimizer as optimizer_lib
from train import state as state_lib
from train.mesh import make_mesh

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                  reason="libtpu absent: pip install -e '.[tpu]' (.ci/run does)")
needs_cuda_plugin = pytest.mark.skipif(
    importlib.util.find_spec('jax_plugins.xla_cuda12') is None,
    reason="CUDA PJRT plugin absent: pip install -e '.[gpu-plan]' (.ci/run does)")
TOPOLOGY = 'tpu:v5p:2x2x1'  # 4 chips, one device each.


def small_config(**model):
  """A small config whose matmuls dominate its FLOPs (d_model 256, 2,048-token vocabulary)."""
  c = config_lib.defaults()
  c.model.update(vocab_size=2048, d_model=256, num_layers=4, num_heads=4, num_kv_heads=2,
                 mlp_dim=1024, compute_dtype='bfloat16', remat='full', attention='splash')
  c.model.update(model)
  c.data.seq_len = 256
  c.mesh.update(data=1, fsdp=-1, expert=1, tensor=1)
  c.optim.update(warmup_steps=1)
  c.train.update(steps=10, global_batch=8, grad_accum=2)
  return c


def moe_config(**model):
  return small_config(**{'num_experts': 4, 'experts_per_token': 2, 'moe_mlp_dim': 512,
                         'dispatch': 'dropless', **model})


@pytest.fixture(scope='module')
def target():
  return targets.abstract_devices(TOPOLOGY)


# ------------------------------------------------------------------ targets and meshes


def test_target_names_are_checked():
  for bad, match in (('v5p:8x8x8', 'PLATFORM:CHIP:TOPOLOGY'), ('tpu:v9:2x2', 'unknown chip')):
    with pytest.raises(ConfigError, match=match):
      targets.parse(bad)


@needs_libtpu
def test_abstract_devices(target):
  assert len(target.devices) == 4 and target.chips == 4 and target.devices_per_chip == 1
  assert target.devices[0].platform == 'tpu'
  assert target.device_hbm_bytes == 95 * 1024 ** 3
  with pytest.raises(ConfigError, match='libtpu cannot describe topology v5p:3x3'):
    targets.abstract_devices('tpu:v5p:3x3')


@needs_libtpu
def test_mesh_that_does_not_fit_the_topology_names_mesh(target):
  with pytest.raises(ConfigError, match=r'mesh.*4 devices'):
    make_mesh({'data': 1, 'fsdp': 3, 'expert': 1, 'tensor': 1}, list(target.devices))
  c = small_config()
  c.mesh.update(fsdp=8)
  with pytest.raises(ConfigError, match='mesh'):
    plan.target_section(c, target)


@needs_libtpu
def test_state_shardings_run_nothing_on_the_mesh(target):
  # optax's tree_map_params runs tx.init eagerly; on abstract devices any op would fail. The
  # shardings must come out of an abstract computation.
  c = small_config()
  cfg = config_lib.validate(c, 4)
  tpu_mesh = make_mesh(c.mesh, list(target.devices))
  tx = optimizer_lib.make(c.optim, c.train.steps)
  with jax.set_mesh(tpu_mesh), use_rules(make_rules()):
    mdef, params = state_lib.model_def(cfg)
    abstract = {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': params,
                'opt_state': jax.eval_shape(tx.init, params),
                'rng': jax.ShapeDtypeStruct((2,), jnp.uint32)}
    shardings = state_lib.state_shardings(mdef, abstract, tx, tpu_mesh)
    assert mesh_platform() == 'tpu'
    assert attn.resolve('auto', 256, 256) == 'splash'
    assert moe.grouped_matmul_kernel('auto') == 'gmm'
  mu = shardings['opt_state'][1][0].mu
  assert jax.tree.leaves(mu)[0].mesh.devices.flat[0].platform == 'tpu'
  assert jax.tree.structure(mu) == jax.tree.structure(shardings['params'])


# ------------------------------------------------------------------ real XLA:TPU compiles


@needs_libtpu
def test_dense_compiles_for_tpu_with_splash(target):
  p = plan.target_section(small_config(), target)
  assert p['target_attention'] == 'splash' and p['target_fits']
  assert 0 < p['target_total_gib'] < p['target_hbm_gib']
  # remat='full' runs the layers' forward twice (the head's once): compiled / model FLOPs is
  # what that explains, within 10% (softmax, norms, RoPE, the optimizer: not in model/flops.py).
  ratio, remat = p['target_compiled_over_model_flops'], p['target_remat_explains']
  assert abs(ratio / remat - 1) < 0.10, (ratio, remat)
  assert p['target_kernel_tflops_per_step'] > 0  # splash, counted analytically.
  coll = p['target_collectives']
  # FSDP over 4 devices: parameters all-gathered (per layer, per micro-batch, forward and
  # remat), gradients reduce-scattered.
  assert coll['all-gather']['count'] >= 2 * 4 * 2, coll
  assert coll['reduce-scatter']['count'] >= 4 * 2, coll
  assert p['target_unknown_trip_counts'] == 0
  assert p['target_roofline_step_s'] == max(p['target_compute_s'], p['target_hbm_s'],
                                            p['target_collectives_s'])
  assert 0 < p['target_roofline_mfu'] <= 1


# gmm (megablox) is `slow` (CI's budget): its compile is the longest of this file.
@needs_libtpu
@pytest.mark.parametrize('kernel', [pytest.param('gmm', marks=pytest.mark.slow), 'ragged_dot'])
def test_dropless_moe_compiles_for_tpu(target, kernel):
  p = plan.target_section(moe_config(grouped_matmul=kernel), target)
  assert p['target_grouped_matmul'] == kernel and p['target_fits']
  ratio = p['target_compiled_over_model_flops'] / p['target_remat_explains']
  if kernel == 'gmm':  # megablox computes the k chosen experts per token (its cost estimate).
    assert abs(ratio - 1) < 0.10, ratio
  else:  # XLA:TPU lowers ragged_dot densely: every token through all e = 2k experts.
    assert ratio > 1.3, ratio


@needs_libtpu
def test_capacity_dispatch_with_expert_axis_has_all_to_all(target):
  c = moe_config(dispatch='capacity')
  c.mesh.update(fsdp=2, expert=2)
  lowered, _ = aot.lower_train_step(c, list(target.devices))
  text = lowered.compile().as_text()
  counted = hlo.collectives(text, 4)
  assert counted.by_kind['all-to-all'].count > 0
  assert counted.by_kind['all-gather'].count > 0


@needs_libtpu
def test_config_over_hbm_is_an_error_naming_knobs():
  # v5e has 16 GiB per chip: a 2,048-wide model over long sequences with no remat does not fit.
  c = small_config(d_model=2048, mlp_dim=8192, num_heads=16, num_kv_heads=16, remat='none',
                   num_layers=8)
  c.data.seq_len = 2048
  c.train.update(global_batch=64, grad_accum=1)
  with pytest.raises(ConfigError, match=r'(needs|HBM).*Try: model.remat=full; a smaller micro-batch'):
    p = plan.target_section(c, targets.abstract_devices('tpu:v5e:2x2'))
    plan.check_target_fits(p, c)


@needs_libtpu
def test_cli_target_table_and_json(tmp_path):
  cmd = [sys.executable, '-m', 'train.plan', '--config', 'experiments/tiny_moe.py',
         f'--target={TOPOLOGY}', '--config.model.dispatch=dropless',
         '--config.model.compute_dtype=bfloat16']
  out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'target_total_gib' in out.stdout and 'target_roofline_mfu' in out.stdout
  assert 'all-gather' in out.stdout
  bad = subprocess.run(cmd[:5] + ['--target=tpu:v5p:2x2x1', '--config.mesh.fsdp=3'],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert bad.returncode == 1 and 'Traceback' not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1].startswith('error: mesh')


@needs_cuda_plugin
def test_dense_compiles_for_gpu_with_cudnn():
  # 16 H100s = 2 hosts of 8: XLA:GPU compiles cuDNN fused attention with no GPU attached.
  target = targets.abstract_devices('gpu:h100:16')
  assert len(target.devices) == 16 and target.local_devices == 8
  c = small_config(attention='cudnn')
  c.train.update(global_batch=32, grad_accum=1)
  with targets.compile_context(target):
    low, _ = aot.lower_train_step(c, list(target.devices))
  text = low.compile().as_text()
  assert '__cudnn$fmha' in text
  p = plan.target_section(c, target)
  assert p['target_fits'] and 0 < p['target_total_gib'] < 79.1
  assert p['target_attention'] == 'cudnn' and 'model/flops.py' in p['target_flops_source']
  coll = p['target_collectives']
  assert coll['all-gather']['count'] > 0 and coll['reduce-scatter']['count'] > 0, coll


# ------------------------------------------------------------------ kernels on CPU, interpreted


def test_hlo_counts_loop_bodies_by_trip_count():
  m = mesh(fsdp=4)

  def f(w_ld):
    def body(carry, w_d):
      return carry + jnp.sum(jax.lax.with_sharding_constraint(w_d, jax.NamedSharding(m, jax.P())) ** 2), None
    return jax.lax.scan(body, 0.0, w_ld)[0]

  w = jax.ShapeDtypeStruct((5, 64), jnp.float32, sharding=jax.NamedSharding(m, jax.P(None, 'fsdp')))
  text = jax.jit(f).lower(w).compile().as_text()
  counted = hlo.collectives(text, 4)
  assert counted.unknown_trip_counts == 0
  gathers = counted.by_kind['all-gather']
  assert gathers.count == 5  # One gather of a [1, 64] row per iteration.
  assert gathers.bytes == 5 * 64 * 4
  assert gathers.moved == gathers.bytes * 3 / 4  # Ring: (n - 1) / n of the result.


def test_splash_under_a_cpu_mesh_matches_reference():
  # shard_map over batch (fsdp) and heads (tensor), GQA groups kept whole per device.
  q, kk, v = qkv(2, 256, 256, 4, 2, 64, seed=3)
  seg0, pos0 = packed([100, 120], 256)
  seg1, pos1 = packed([256], 256)
  seg, pos = jnp.stack([seg0, seg1]), jnp.stack([pos0, pos1])
  masks = {'q_segment_ids_bt': seg, 'kv_segment_ids_bs': seg, 'q_positions_bt': pos,
           'kv_positions_bs': pos}
  want = run('reference', q, kk, v, masks)
  with jax.set_mesh(mesh(fsdp=2, tensor=2)), use_rules(make_rules()):
    got = jax.jit(lambda *a: attn._splash(*a, interpret=True))(q, kk, v, seg, seg)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_splash_refuses_a_split_sequence():
  q, kk, v = qkv(2, 128, 128, 4, 2, 8)
  seg = jnp.ones((2, 128), jnp.int32)
  with jax.set_mesh(mesh(tensor=2)), use_rules(make_rules({'length': 'tensor'})):
    with pytest.raises(ValueError, match='whole sequences'):
      jax.jit(lambda *a: attn._splash(*a, interpret=True))(q, kk, v, seg, seg)


def test_gmm_matches_ragged_dot():
  x_md = jax.random.normal(jax.random.key(0), (200, 128))
  w_eij = jax.random.normal(jax.random.key(1), (4, 128, 256))
  sizes_e = jnp.array([50, 0, 120, 30], jnp.int32)
  loss = lambda kernel: lambda x, w: jnp.sum(moe.grouped_matmul(x, w, sizes_e, kernel) ** 2)
  np.testing.assert_allclose(moe.grouped_matmul(x_md, w_eij, sizes_e, 'gmm'),
                             jax.lax.ragged_dot(x_md, w_eij, sizes_e), rtol=1e-5, atol=1e-4)
  got = jax.grad(loss('gmm'), (0, 1))(x_md, w_eij)
  want = jax.grad(loss('ragged_dot'), (0, 1))(x_md, w_eij)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-3)


def test_dropless_block_with_gmm_under_a_mesh_matches_ragged_dot():
  cfg = tiny_cfg(d_model=128, num_experts=4, experts_per_token=2, moe_mlp_dim=256,
                 dispatch='dropless')
  x_btd = jax.random.normal(jax.random.key(2), (4, 16, 128))
  outs = {}
  for kernel in ('ragged_dot', 'gmm'):
    block = moe.MoeBlock(dataclasses.replace(cfg, grouped_matmul=kernel), nnx.Rngs(0))
    graphdef, state = nnx.split(block)

    def loss(state, x_btd):
      y_btd, _ = nnx.merge(graphdef, state)(x_btd)
      return jnp.sum(y_btd ** 2)

    with jax.set_mesh(mesh(fsdp=2, tensor=2)), use_rules(make_rules()):
      outs[kernel] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(state, x_btd)
  (l1, (gs1, gx1)), (l2, (gs2, gx2)) = outs['ragged_dot'], outs['gmm']
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  np.testing.assert_allclose(gx1, gx2, rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree.leaves(gs1), jax.tree.leaves(gs2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
