"""Sharded == single device (loss and gradients), and params/optimizer state really sharded."""

import jax
import numpy as np
import pytest

from model.sharding import make_rules, use_rules
from tests.util import max_abs_diff, mesh, packed_batch, run_config, tiny_cfg
from train import optimizer, state as state_lib, step as step_lib
from train.step import device_batch
from jax.sharding import NamedSharding, PartitionSpec as P


def loss_and_grads(mesh_sizes, cfg, batch, accum=1):
  m = mesh(**mesh_sizes)
  tx = optimizer.make(run_config().optim, 10)
  with jax.set_mesh(m), use_rules(make_rules()):
    state, shardings, mdef = state_lib.create(cfg, tx, m, seed=0)
    sharding = NamedSharding(m, P(None, ('data', 'fsdp', 'expert'), None))
    dbatch = device_batch(batch, accum, sharding)

    @jax.jit
    def f(params, b):
      grads, count, sums = step_lib.accumulate(step_lib.lm_loss(mdef), params, b, None)
      return sums['loss'] / count, jax.tree.map(lambda g: g / count, grads)
    loss, grads = f(state['params'], dbatch)
  return state, loss, grads


@pytest.mark.parametrize('sizes', [dict(fsdp=4, tensor=2), dict(fsdp=8)])
def test_sharded_equals_single_device(sizes):
  cfg = tiny_cfg(vocab_size=128, d_model=64, num_heads=4, num_kv_heads=2, mlp_dim=128)
  batch = packed_batch(8, 16, cfg.vocab_size)
  _, ref_loss, ref_grads = loss_and_grads({}, cfg, batch)
  state, loss, grads = loss_and_grads(sizes, cfg, batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert max_abs_diff(grads, ref_grads) < 1e-5
  # Params AND Adam moments are split: fsdp on `embed`, tensor on heads / mlp.
  q = state['params']['layers']['attn']['q_dnh']  # [L, d, n, h]
  mu = state['opt_state'][1][0].mu['layers']['attn']['q_dnh']
  expected = (2, 64 // sizes['fsdp'], 4 // sizes.get('tensor', 1), 16)
  for x in (q, mu):
    assert x.addressable_shards[0].data.shape == expected
  up = state['opt_state'][1][0].nu['layers']['mlp']['up_df']  # [L, d, f]
  assert up.addressable_shards[0].data.shape == (2, 64 // sizes['fsdp'], 128 // sizes.get('tensor', 1))


def test_gradient_accumulation_1x8_equals_8x1():
  cfg = tiny_cfg()
  batch = packed_batch(8, 16, cfg.vocab_size, seed=3)
  _, loss1, grads1 = loss_and_grads(dict(fsdp=8), cfg, batch, accum=1)
  _, loss8, grads8 = loss_and_grads({}, cfg, batch, accum=8)
  np.testing.assert_allclose(loss1, loss8, rtol=1e-6)
  assert max_abs_diff(grads1, grads8) < 1e-6


def test_accumulation_weights_by_tokens_not_micro_batches():
  # Micro-batches with very different token counts: the mean must be over all tokens.
  cfg = tiny_cfg()
  batch = packed_batch(2, 16, cfg.vocab_size, seed=4)
  batch['loss_mask'][1, 3:] = 0.0
  _, loss, _ = loss_and_grads({}, cfg, batch, accum=2)
  _, loss_one, _ = loss_and_grads({}, cfg, batch, accum=1)
  np.testing.assert_allclose(loss, loss_one, rtol=1e-6)
