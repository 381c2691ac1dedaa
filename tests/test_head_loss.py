"""train/head_loss.py: the fused, chunked head + loss equals logits -> token_nll, in value and
gradients, on one device and on meshes that split tokens and/or the vocabulary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from train import head_loss
from train.step import token_nll

B, T, D, V = 8, 64, 16, 96


def inputs():
  k = jax.random.split(jax.random.key(0), 4)
  h = jax.random.normal(k[0], (B, T, D))
  w = jax.random.normal(k[1], (D, V))
  targets = jax.random.randint(k[2], (B, T), 0, V)
  mask = (jax.random.uniform(k[3], (B, T)) > 0.3).astype(jnp.float32)
  return h, w, targets, mask


def plain(h, w, targets, mask):
  return jnp.sum(token_nll(jnp.einsum('btd,dv->btv', h, w), targets) * mask)


def check(got, want):
  (value, grads), (want_value, want_grads) = got, want
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  for a, b in zip(grads, want_grads):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('chunk_tokens', [64, 1024])  # 8 chunks of 8 positions; one chunk.
def test_equals_plain_on_one_device(monkeypatch, chunk_tokens):
  monkeypatch.setattr(head_loss, 'CHUNK_TOKENS', chunk_tokens)
  h, w, targets, mask = inputs()
  want = jax.value_and_grad(plain, argnums=(0, 1))(h, w, targets, mask)
  fused = lambda h, w: head_loss.head_nll_sum(h, w, targets, mask)
  check(jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(h, w), want)
  np.testing.assert_allclose(jax.jit(fused)(h, w), want[0], rtol=1e-6)  # Loss-only path.


@pytest.mark.parametrize('shape', [(1, 4, 1, 2), (1, 8, 1, 1), (2, 2, 2, 1), (1, 1, 1, 8)],
                         ids=['fsdp4_tensor2', 'fsdp8', 'data2_fsdp2_expert2', 'tensor8'])
def test_equals_plain_on_meshes(monkeypatch, shape):
  monkeypatch.setattr(head_loss, 'CHUNK_TOKENS', 32)  # Several chunks per device.
  h, w, targets, mask = inputs()
  want = jax.value_and_grad(plain, argnums=(0, 1))(h, w, targets, mask)
  mesh = jax.make_mesh(shape, ('data', 'fsdp', 'expert', 'tensor'), axis_types=(AxisType.Auto,) * 4)
  fused = lambda h, w: head_loss.head_nll_sum(h, w, targets, mask)
  with jax.set_mesh(mesh):
    h_s = jax.device_put(h, NamedSharding(mesh, P(('data', 'fsdp', 'expert'))))
    w_s = jax.device_put(w, NamedSharding(mesh, P('fsdp', 'tensor')))
    got = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(h_s, w_s)
    value = jax.jit(fused)(h_s, w_s)
  check(got, want)
  np.testing.assert_allclose(value, want[0], rtol=1e-6)
