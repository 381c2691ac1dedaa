"""Whole-model MoE: Mixtral's exact counts, expert-parallel == one device, capacity == dropless
in the Decoder, the real train loop (loss falls, MoE metrics logged, resume bit-identical), and
active-expert FLOP accounting against a hand formula."""

import dataclasses
import functools
import math
import pathlib
import shutil
import struct

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from experiments import mixtral_8x7b
from model import count_params, training_flops_per_token
from model.moe import AUX_KEYS
from model.sharding import logical_to_spec, make_rules, use_rules
from tests.util import mesh, packed_batch, run_config, tiny_cfg
from train import loop
from train import state as state_lib
from train import step as step_lib
from train.config import model_config

E, K, D, F = 8, 2, 32, 32
CFG = tiny_cfg(vocab_size=128, d_model=D, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
               mlp_dim=64, num_experts=E, experts_per_token=K, moe_mlp_dim=F,
               dispatch='capacity', capacity_factor=1.25)
MICRO, T = 8, 16


# ---------------------------------------------------------------- Mixtral 8x7B counts


def test_mixtral_counts_exact_via_eval_shape():
  cfg = model_config(mixtral_8x7b.get_config())
  counts = count_params(cfg)  # jax.eval_shape inside: 187 GB of float32 is never allocated.
  assert counts.total == 46_702_792_704
  assert counts.active == 12_879_925_248
  # By hand: per layer attention 2*4096*4096 + 2*4096*1024, router 4096*8, norms 2*4096,
  # experts 3*4096*14336 each (8 stored, 2 active); plus embedding, head, final norm.
  d, f, layers, v = 4096, 14_336, 32, 32_000
  shared = layers * (2 * d * d + 2 * d * 1024 + d * 8 + 2 * d) + 2 * v * d + d
  assert counts.total == shared + layers * 8 * 3 * d * f
  assert counts.active == shared + layers * 2 * 3 * d * f


# ---------------------------------------------------------------- expert parallel == one device


@functools.lru_cache(maxsize=1)
def initial_params():
  """CFG's initial params as numpy (one init compile for the whole file; the variants below
  differ only in dispatch, capacity factor or remat, not in parameter shapes)."""
  init = jax.jit(functools.partial(state_lib.init_params, CFG))
  return jax.tree.map(np.asarray, init(jax.random.PRNGKey(0)))


def loss_and_grads(cfg, mesh_, rules=None):
  """Loss, aux, gradients (each / token count), the params and the compiled HLO of
  step.accumulate of the LM loss over one micro-batch, with params and batch laid out on `mesh_`."""
  rules = make_rules() if rules is None else rules
  b = packed_batch(MICRO, T, cfg.vocab_size, seed=3)
  batch = {k: v[None] for k, v in b.items()}  # One micro-batch: [1, MICRO, T].
  with jax.set_mesh(mesh_), use_rules(rules):
    mdef, abstract = state_lib.model_def(cfg)
    shardings = state_lib.param_shardings(mdef, abstract, mesh_)
    params = jax.device_put(initial_params(), shardings)
    batch = jax.device_put(batch, NamedSharding(mesh_, logical_to_spec((None, 'batch', 'length'))))
    fn = jax.jit(lambda p, b: step_lib.accumulate(step_lib.lm_loss(mdef), p, b, None))
    compiled = fn.lower(params, batch).compile()
    grads, count, sums = compiled(params, batch)
    nll = sums['loss']
    aux = {k[len('moe/'):]: v / count for k, v in sums.items() if k != 'loss'}
  grads = jax.tree.map(lambda g: g / count, grads)
  return {'loss': float(nll / count), 'aux': {k: float(v) for k, v in aux.items()},
          'grads': grads, 'params': params, 'hlo': compiled.as_text()}


@pytest.fixture(scope='module')
def one_device():
  return loss_and_grads(CFG, mesh())


def assert_same(got, want, grad_rtol=1e-5):
  np.testing.assert_allclose(got['loss'], want['loss'], rtol=1e-6)
  for key in AUX_KEYS:
    np.testing.assert_allclose(got['aux'][key], want['aux'][key], rtol=1e-5, atol=1e-7,
                               err_msg=key)
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(want['grads']))
  for path, g in jax.tree_util.tree_leaves_with_path(got['grads']):
    w = functools.reduce(lambda t, p: t[p.key], path, want['grads'])
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=grad_rtol * scale,
                               err_msg=jax.tree_util.keystr(path))


def shard_shapes(params, *names):
  out = {}
  for name in names:
    x = functools.reduce(lambda t, k: t[k], name.split('/'), params)
    shapes = {s.data.shape for s in x.addressable_shards}
    assert len(shapes) == 1, (name, shapes)
    out[name] = shapes.pop()
  return out


EXPERT_PARAMS = ('layers/mlp/gate_edf', 'layers/mlp/up_edf', 'layers/mlp/down_efd',
                 'layers/mlp/router_de')
# Per-device shapes, written out by hand. Stored: gate/up [L=2, e=8, d=32, f=32],
# down [2, 8, f, d], router [2, d, e] (d over fsdp, experts never split: every token needs all
# logits). `expert` splits e, `fsdp` splits d (expert_embed), `tensor` splits f (expert_mlp).
LAYOUTS = {
    'expert2': (dict(expert=2), {
        'layers/mlp/gate_edf': (2, 4, 32, 32), 'layers/mlp/up_edf': (2, 4, 32, 32),
        'layers/mlp/down_efd': (2, 4, 32, 32), 'layers/mlp/router_de': (2, 32, 8)}),
    'expert4_fsdp2': (dict(fsdp=2, expert=4), {
        'layers/mlp/gate_edf': (2, 2, 16, 32), 'layers/mlp/up_edf': (2, 2, 16, 32),
        'layers/mlp/down_efd': (2, 2, 32, 16), 'layers/mlp/router_de': (2, 16, 8)}),
    'expert8': (dict(expert=8), {
        'layers/mlp/gate_edf': (2, 1, 32, 32), 'layers/mlp/up_edf': (2, 1, 32, 32),
        'layers/mlp/down_efd': (2, 1, 32, 32), 'layers/mlp/router_de': (2, 32, 8)}),
    'expert4_tensor2': (dict(expert=4, tensor=2), {
        'layers/mlp/gate_edf': (2, 2, 32, 16), 'layers/mlp/up_edf': (2, 2, 32, 16),
        'layers/mlp/down_efd': (2, 2, 16, 32), 'layers/mlp/router_de': (2, 32, 8)}),
}


# The two layouts run by default; the other two are @slow (each is a full compile).
@pytest.mark.parametrize('name', [
    pytest.param('expert2', marks=pytest.mark.slow), 'expert4_fsdp2', 'expert8',
    pytest.param('expert4_tensor2', marks=pytest.mark.slow)])
def test_expert_parallel_matches_one_device(name, one_device):
  sizes, want_shapes = LAYOUTS[name]
  # expert8 also recomputes the forward in the backward (remat='full'): the experts'
  # hand-written backward under jax.checkpoint, checked against the one-device run without.
  cfg = dataclasses.replace(CFG, remat='full') if name == 'expert8' else CFG
  got = loss_and_grads(cfg, mesh(**sizes))
  assert one_device['aux']['dropped_fraction'] > 0  # Capacity 1.25 drops some: also compared.
  assert_same(got, one_device)
  assert shard_shapes(got['params'], *EXPERT_PARAMS) == want_shapes
  # Tokens reach the experts' devices by all-to-all, chosen by the SPMD partitioner.
  assert ' all-to-all(' in got['hlo'] or ' all-to-all-start(' in got['hlo']


# ---------------------------------------------------------------- dispatches in the Decoder


def test_capacity_equals_dropless_when_nothing_is_dropped(one_device):
  no_drop = dataclasses.replace(CFG, capacity_factor=E / K)  # capacity == t: no drop possible.
  capacity = loss_and_grads(no_drop, mesh())
  dropless = loss_and_grads(dataclasses.replace(no_drop, dispatch='dropless'), mesh())
  assert capacity['aux']['dropped_fraction'] == 0.0
  assert_same(capacity, dropless)
  # Same params with factor 1.25 (the fixture) drop some assignments: a different function,
  # so the comparison above can fail.
  assert one_device['aux']['dropped_fraction'] > 0.01
  assert abs(one_device['loss'] - dropless['loss']) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_gives_the_same_gradients(remat, one_device):
  """The experts' hand-written backward (model/moe.py expert_swiglu) under jax.checkpoint."""
  assert_same(loss_and_grads(dataclasses.replace(CFG, remat=remat), mesh()), one_device)


# ---------------------------------------------------------------- the real train loop


def moe_run_config(**model_overrides):
  """tests/util.run_config with 4 experts top-2 in layer 2 of 2 (moe_every=2: dense + MoE),
  expert=4 x fsdp=2."""
  c = run_config()
  c.model.update(num_experts=4, experts_per_token=2, moe_mlp_dim=32, moe_every=2,
                 dispatch='capacity', capacity_factor=1.25)
  c.model.update(model_overrides)
  c.mesh.update(data=1, fsdp=2, expert=4, tensor=1)
  return c


def tb_tags(tb_dir) -> set[str]:
  """Scalar tags in the TFRecord event files tensorboardX wrote."""
  from tensorboardX.proto import event_pb2
  tags = set()
  for path in pathlib.Path(tb_dir).glob('events.out.tfevents.*'):
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4  # length, its crc, the record, its crc.
      tags.update(value.tag for value in event.summary.value)
  return tags


def test_tiny_moe_trains_logs_and_resumes_bit_identically(tmp_path):
  straight = loop.run(moe_run_config(), str(tmp_path / 'a'))  # Checkpoints at steps 3 and 6.
  train = [h for h in straight.history if 'loss' in h]
  assert [h['step'] for h in train] == [1, 2, 3, 4, 5, 6]
  assert train[-1]['loss'] < train[0]['loss'] - 0.3, [h['loss'] for h in train]
  moe_keys = {f'moe/{k}' for k in AUX_KEYS}
  assert moe_keys <= set(train[0]) and moe_keys <= tb_tags(tmp_path / 'a' / 'tb')
  for h in train:
    assert 0 <= h['moe/expert_load_min'] <= 0.25 <= h['moe/expert_load_max'] <= 1
    assert 0 <= h['moe/dropped_fraction'] < 0.5
    assert 0 < h['moe/router_entropy'] <= math.log(4) + 1e-6
    assert h['moe/load_balance_loss'] >= 1 - 1e-6  # Its minimum; and 0.01 * lb + 0.001 * z:
    np.testing.assert_allclose(h['moe/aux_loss'], 0.01 * h['moe/load_balance_loss'] +
                               0.001 * h['moe/router_z_loss'], rtol=1e-5)
  gate = straight.state['params']['layers']['block1']['mlp']['gate_edf']  # [1, e=4, d=32, f=32]
  assert {s.data.shape for s in gate.addressable_shards} == {(1, 1, 16, 32)}

  # The same run stopped after step 3: its workdir with the step-6 checkpoint removed (the
  # step-3 one is what `stop_after=3` would have left; the tokenizer comes along).
  shutil.copytree(tmp_path / 'a', tmp_path / 'b')
  shutil.rmtree(tmp_path / 'b' / 'checkpoints' / '6')
  resumed = loop.run(moe_run_config(), str(tmp_path / 'b'))
  assert int(resumed.state['step']) == 6
  a = {h['step']: h for h in straight.history if 'loss' in h}
  b = {h['step']: h for h in resumed.history if 'loss' in h}
  assert sorted(b) == [4, 5, 6]
  for s in (4, 5, 6):
    assert {k: a[s][k] for k in moe_keys | {'loss'}} == {k: b[s][k] for k in moe_keys | {'loss'}}
  for x, y in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
@pytest.mark.parametrize('dispatch', ['capacity', 'dropless'])
def test_tiny_moe_every_layer_trains(tmp_path, dispatch):
  c = moe_run_config(moe_every=1, dispatch=dispatch)
  train = [h for h in loop.run(c, str(tmp_path)).history if 'loss' in h]
  assert train[-1]['loss'] < train[0]['loss'] - 0.3, [h['loss'] for h in train]
  assert (train[-1]['moe/dropped_fraction'] == 0) == (dispatch == 'dropless')


# ---------------------------------------------------------------- FLOP accounting


def hand_flops(*, v, d, layers, n, kv, h, f, e, k, fe, every, seq):
  """3 x (2 x matmul params one token touches + 4 x layers x n x h x mean keys): (active,
  dense-equivalent). MoE layers: router d x e plus k (or all e) SwiGLU experts of width fe."""
  attn_proj = 2 * d * n * h + 2 * d * kv * h
  moe_layers = layers // every
  dense_layers = layers - moe_layers
  shared = layers * attn_proj + dense_layers * 3 * d * f + moe_layers * d * e + d * v
  attention = 4 * layers * n * h * (seq + 1) / 2
  active = 3 * (2 * (shared + moe_layers * k * 3 * d * fe) + attention)
  dense_eq = 3 * (2 * (shared + moe_layers * e * 3 * d * fe) + attention)
  return active, dense_eq


@pytest.mark.parametrize('every', [1, 2])
def test_flops_count_active_experts_plus_router(every):
  cfg = tiny_cfg(vocab_size=2048, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2,
                 mlp_dim=512, num_experts=4, experts_per_token=2, moe_mlp_dim=256,
                 moe_every=every)
  flops = training_flops_per_token(cfg, 128)
  active, dense_eq = hand_flops(v=2048, d=128, layers=4, n=4, kv=2, h=32, f=512, e=4, k=2,
                                fe=256, every=every, seq=128)
  assert flops.per_token == active and flops.dense_equivalent == dense_eq
  # Only the experts differ: (e - k) experts x 3 matmuls x fwd+bwd per MoE layer.
  assert dense_eq - active == 3 * 2 * (4 // every) * 2 * 3 * 128 * 256


def test_mixtral_flops_per_token():
  config = mixtral_8x7b.get_config()
  flops = training_flops_per_token(model_config(config), config.data.seq_len)
  active, dense_eq = hand_flops(v=32_000, d=4096, layers=32, n=32, kv=8, h=128, f=14_336, e=8,
                                k=2, fe=14_336, every=1, seq=32_768)
  assert flops.per_token == active and flops.dense_equivalent == dense_eq
  # 6 x (12.88B active - 0.13B input table, a lookup) plus attention over 16k keys on average.
  assert 6 * 12.7e9 < flops.per_token - flops.attention_per_token < 6 * 12.8e9
