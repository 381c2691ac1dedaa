"""Decoder invariants: shapes, causality, packing, scan == unrolled, remat, GQA special cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import Decoder
from train.state import init_params, model_def
from tests.util import max_abs_diff, packed_batch, tiny_cfg


def make(cfg, seed=0):
  return Decoder(cfg, nnx.Rngs(seed))


def test_shapes_and_dtypes():
  cfg = tiny_cfg(compute_dtype='bfloat16')
  model = make(cfg)
  logits, aux = model(jnp.zeros((3, 11), jnp.int32))
  assert logits.shape == (3, 11, cfg.vocab_size) and logits.dtype == jnp.float32
  assert aux == {}
  assert model.embed.table_vd[...].dtype == jnp.float32  # Params stay float32.


@pytest.mark.parametrize('kv_heads', [4, 2, 1])  # MHA, GQA, MQA.
def test_causality(kv_heads):
  cfg = tiny_cfg(num_kv_heads=kv_heads)
  model = make(cfg)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg.vocab_size)
  base, _ = model(tokens)
  t = 9
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % cfg.vocab_size)
  new, _ = model(changed)
  np.testing.assert_allclose(base[:, :t], new[:, :t], atol=1e-6)  # Before t: untouched.
  assert float(jnp.max(jnp.abs(base[:, t:] - new[:, t:]))) > 1e-4  # From t on: changed.


def test_packed_equals_separate_documents():
  cfg = tiny_cfg()
  model = make(cfg)
  b = packed_batch(1, 24, cfg.vocab_size, docs_per_row=3)
  packed, _ = model(b['inputs'], b['positions'], b['segment_ids'])
  for seg in range(1, 4):
    idx = np.nonzero(b['segment_ids'][0] == seg)[0]
    alone, _ = model(b['inputs'][:, idx])  # Positions 0.. and a single segment by default.
    np.testing.assert_allclose(packed[0, idx], alone[0], atol=2e-5)


def test_scan_equals_unrolled_and_remat_is_exact():
  cfg = tiny_cfg(num_layers=3)
  params = init_params(cfg, jax.random.PRNGKey(0))
  b = packed_batch(2, 16, cfg.vocab_size)

  def loss(cfg):
    mdef, _ = model_def(cfg)

    def f(p):
      logits, _ = mdef.build(p)(b['inputs'], b['positions'], b['segment_ids'])
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
    return jax.jit(jax.value_and_grad(f))(params)

  ref = loss(cfg)
  for variant in (tiny_cfg(num_layers=3, scan_layers=False), tiny_cfg(num_layers=3, remat='full'),
                  tiny_cfg(num_layers=3, remat='dots_no_batch'), tiny_cfg(num_layers=3, remat='attn_proj')):
    assert max_abs_diff(ref, loss(variant)) < 1e-5, variant


def test_tied_embeddings_have_no_head():
  model = make(tiny_cfg(tie_embeddings=True))
  assert not hasattr(model, 'head_dv')
  logits, _ = model(jnp.ones((1, 4), jnp.int32))
  assert logits.shape == (1, 4, 97)


def test_swiglu_written_out_backward_equals_autodiff():
  from model.layers import swiglu
  keys = jax.random.split(jax.random.key(3), 5)
  x = jax.random.normal(keys[0], (2, 5, 8))
  ws = (jax.random.normal(keys[1], (8, 12)), jax.random.normal(keys[2], (8, 12)),
        jax.random.normal(keys[3], (12, 8)))
  probe = jax.random.normal(keys[4], (2, 5, 8))
  plain = lambda x, g, u, d: jnp.einsum('btf,fd->btd', jax.nn.silu(x @ g) * (x @ u), d)
  ours = jax.grad(lambda *a: jnp.sum(swiglu(*a) * probe), argnums=(0, 1, 2, 3))(x, *ws)
  ref = jax.grad(lambda *a: jnp.sum(plain(*a) * probe), argnums=(0, 1, 2, 3))(x, *ws)
  np.testing.assert_allclose(swiglu(x, *ws), plain(x, *ws), rtol=1e-5, atol=1e-5)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

