"""model/attention.py: every implementation against the reference, masks, KV cache, memory."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import Decoder
from model import attention as attn
from tests.util import tiny_cfg

CPU_IMPLS = ('reference', 'xla', 'chunked')
HEADS = {'mha': (4, 4), 'gqa': (4, 2), 'mqa': (4, 1)}  # (query heads, kv heads)


def qkv(b, t, s, n, k, h, seed=0, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (b, t, n, h), dtype), jax.random.normal(kk, (b, s, k, h), dtype),
          jax.random.normal(kv, (b, s, k, h), dtype))


def packed(doc_lengths, total):
  """Segment ids 1, 2, ... and per-document positions, padded with segment 0 to `total`."""
  seg, pos = [], []
  for i, length in enumerate(doc_lengths):
    seg += [i + 1] * length
    pos += list(range(length))
  pad = total - len(seg)
  return jnp.array(seg + [0] * pad, jnp.int32), jnp.array(pos + list(range(pad)), jnp.int32)


def batch_masks(t):
  """Row 0: three packed documents plus padding; row 1: one causal document."""
  seg0, pos0 = packed([5, 11, t - 20], t)
  seg1, pos1 = packed([t], t)
  seg, pos = jnp.stack([seg0, seg1]), jnp.stack([pos0, pos1])
  return dict(q_segment_ids_bt=seg, kv_segment_ids_bs=seg, q_positions_bt=pos, kv_positions_bs=pos)


_jit_attention = jax.jit(attn.attention, static_argnames=('implementation', 'chunk_size'))


def run(impl, q, k, v, masks, chunk_size=8):
  return _jit_attention(q, k, v, **masks, implementation=impl, chunk_size=chunk_size)


def loss_and_grads(impl, q, k, v, masks, chunk_size=8):
  w = jax.random.normal(jax.random.key(7), q.shape, jnp.float32)

  def loss(q, k, v):
    return jnp.sum(run(impl, q, k, v, masks, chunk_size).astype(jnp.float32) * w)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


def numpy_attention(q, k, v, masks):
  """Independent loop implementation of the contract (float64), to check the reference itself."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  m = {name: np.asarray(x) for name, x in masks.items()}
  b, t, n, h = q.shape
  g = n // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for i in range(t):
      allowed = ((m['kv_segment_ids_bs'][bi] == m['q_segment_ids_bt'][bi, i]) &
                 (m['kv_positions_bs'][bi] <= m['q_positions_bt'][bi, i]))
      if not allowed.any():
        continue
      for head in range(n):
        logits = k[bi, allowed, head // g] @ q[bi, i, head] / np.sqrt(h)
        p = np.exp(logits - logits.max())
        out[bi, i, head] = (p / p.sum()) @ v[bi, allowed, head // g]
  return out


@pytest.mark.parametrize('heads', HEADS)
def test_reference_matches_numpy_loop(heads):
  n, k = HEADS[heads]
  q, kk, v = qkv(2, 24, 24, n, k, 8)
  masks = batch_masks(24)
  np.testing.assert_allclose(run('reference', q, kk, v, masks), numpy_attention(q, kk, v, masks),
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('heads', HEADS)
@pytest.mark.parametrize('impl', ['xla', 'chunked'])
def test_matches_reference_outputs_and_grads(impl, heads):
  # t = 37 is not a multiple of the chunk (8): exercises the padded tail blocks.
  n, k = HEADS[heads]
  q, kk, v = qkv(2, 37, 37, n, k, 16)
  masks = batch_masks(37)
  loss, grads = loss_and_grads(impl, q, kk, v, masks)
  ref_loss, ref_grads = loss_and_grads('reference', q, kk, v, masks)
  np.testing.assert_allclose(run(impl, q, kk, v, masks), run('reference', q, kk, v, masks),
                             atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(loss, ref_loss, atol=1e-4, rtol=1e-5)
  for name, got, want in zip('qkv', grads, ref_grads):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f'd{name}')


@pytest.mark.parametrize('chunk_size', [1, 5, 16, 4096])
def test_chunked_any_chunk_size(chunk_size):
  q, kk, v = qkv(2, 37, 37, 4, 2, 8, seed=3)
  masks = batch_masks(37)
  np.testing.assert_allclose(run('chunked', q, kk, v, masks, chunk_size),
                             run('reference', q, kk, v, masks), atol=1e-5, rtol=1e-5)


def test_packed_documents_do_not_see_each_other():
  # Document 2 of row 0 (tokens 5..15) must give the same output as that document alone.
  q, kk, v = qkv(2, 37, 37, 4, 2, 8, seed=1)
  masks = batch_masks(37)
  seg, pos = packed([11], 11)
  alone = {'q_segment_ids_bt': seg[None], 'kv_segment_ids_bs': seg[None],
           'q_positions_bt': pos[None], 'kv_positions_bs': pos[None]}
  for impl in CPU_IMPLS:
    full = run(impl, q, kk, v, masks)[0, 5:16]
    single = run(impl, q[:1, 5:16], kk[:1, 5:16], v[:1, 5:16], alone)[0]
    np.testing.assert_allclose(full, single, atol=1e-5, rtol=1e-5, err_msg=impl)


@pytest.mark.parametrize('impl', CPU_IMPLS)
def test_causality(impl):
  q, kk, v = qkv(2, 32, 32, 4, 2, 8, seed=2)
  masks = batch_masks(32)
  cut = 20  # Row 1 is a single document: keys at index >= cut are in every query's future.
  out = run(impl, q, kk, v, masks)
  k2 = kk.at[1, cut:].set(100.0)
  v2 = v.at[1, cut:].set(-100.0)
  out2 = run(impl, q, k2, v2, masks)
  np.testing.assert_allclose(out2[1, :cut], out[1, :cut], atol=1e-6, rtol=0)
  assert np.abs(out2[1, cut:] - out[1, cut:]).max() > 1.0  # The change is visible where allowed.


@pytest.mark.parametrize('heads', ['gqa', 'mqa'])
@pytest.mark.parametrize('impl', CPU_IMPLS)
def test_kv_cache_step_equals_full_attention_row(impl, heads):
  n, k = HEADS[heads]
  length, cache = 13, 24
  q, kk, v = qkv(1, length, length, n, k, 8, seed=4)
  seg, pos = packed([length], length)
  full = run(impl, q, kk, v, {'q_segment_ids_bt': seg[None], 'kv_segment_ids_bs': seg[None],
                              'q_positions_bt': pos[None], 'kv_positions_bs': pos[None]})
  # A cache with `cache` slots: the first `length` filled, the rest garbage with segment 0.
  _, junk_k, junk_v = qkv(1, 1, cache, n, k, 8, seed=5)
  cache_k = junk_k.at[:, :length].set(kk)
  cache_v = junk_v.at[:, :length].set(v)
  cache_seg = jnp.where(jnp.arange(cache) < length, 1, 0)[None].astype(jnp.int32)
  cache_pos = jnp.arange(cache, dtype=jnp.int32)[None]
  for p in (0, 6, length - 1):
    # Slots after p hold keys of later tokens (already written): the position rule hides them.
    step = run(impl, q[:, p:p + 1], cache_k, cache_v,
               {'q_segment_ids_bt': jnp.ones((1, 1), jnp.int32), 'kv_segment_ids_bs': cache_seg,
                'q_positions_bt': jnp.full((1, 1), p, jnp.int32), 'kv_positions_bs': cache_pos},
               chunk_size=5)
    np.testing.assert_allclose(step[0, 0], full[0, p], atol=1e-5, rtol=1e-5, err_msg=f'p={p}')


@pytest.mark.parametrize('impl', CPU_IMPLS)
def test_fully_masked_rows_are_zero_and_finite(impl):
  q, kk, v = qkv(1, 16, 16, 4, 2, 8, seed=6)
  seg = jnp.array([[1] * 8 + [2] * 8], jnp.int32)
  kv_seg = jnp.array([[1] * 8 + [0] * 8], jnp.int32)  # Queries of segment 2 have no key at all.
  pos = jnp.array([list(range(8)) * 2], jnp.int32)
  masks = {'q_segment_ids_bt': seg, 'kv_segment_ids_bs': kv_seg, 'q_positions_bt': pos,
           'kv_positions_bs': pos}
  out = run(impl, q, kk, v, masks)
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_array_equal(out[0, 8:], 0.0)
  np.testing.assert_allclose(out[0, :8], run('reference', q, kk, v, masks)[0, :8], atol=1e-5)
  _, grads = loss_and_grads(impl, q, kk, v, masks)
  for grad in grads:
    assert np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize('impl', ['xla', 'chunked'])
def test_bfloat16(impl):
  q, kk, v = qkv(2, 37, 37, 4, 2, 16, seed=8, dtype=jnp.bfloat16)
  masks = batch_masks(37)
  out = run(impl, q, kk, v, masks)
  assert out.dtype == jnp.bfloat16
  want = run('reference', *(x.astype(jnp.float32) for x in (q, kk, v)), masks)
  np.testing.assert_allclose(out.astype(jnp.float32), want, atol=3e-2, rtol=3e-2)
  _, grads = loss_and_grads(impl, q, kk, v, masks)
  _, ref_grads = loss_and_grads('reference', *(x.astype(jnp.float32) for x in (q, kk, v)), masks)
  for got, want in zip(grads, ref_grads):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=0.1, rtol=0.05)


def test_chunked_memory_grows_linearly():
  """Compiled temp memory of forward+backward: linear in t, far below one [n, t, t] matrix."""
  n, h = 4, 32

  def temp_bytes(t):
    def loss(q, k, v, seg, pos):
      out = attn.attention(q, k, v, q_segment_ids_bt=seg, kv_segment_ids_bs=seg,
                           q_positions_bt=pos, kv_positions_bs=pos, implementation='chunked',
                           chunk_size=256)
      return out.sum()
    spec = jax.ShapeDtypeStruct((1, t, n, h), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec, ids, ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  small, large = temp_bytes(2048), temp_bytes(8192)
  assert large < 4 * small * 1.1, (small, large)  # 4x the tokens, not 16x the memory.
  assert large < n * 8192 * 8192 * 4 / 16, large


def _layer_scan_grad(t, n, h, chunk, *, scan, remat=False, layers=2):
  """jax.grad of `layers` chunked self-attention layers over a closed-over causal mask."""
  seg = jnp.ones((1, t), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, t))

  def layer(x_btnh, w):
    x_btnh = x_btnh * w
    return attn.attention(x_btnh, x_btnh, x_btnh, q_segment_ids_bt=seg, kv_segment_ids_bs=seg,
                          q_positions_bt=pos, kv_positions_bs=pos, implementation='chunked',
                          chunk_size=chunk), None

  if remat:
    layer = jax.checkpoint(layer)

  def loss(x_btnh, w_l):
    if scan:
      return jnp.sum(jax.lax.scan(layer, x_btnh, w_l)[0])
    for i in range(layers):
      x_btnh = layer(x_btnh, w_l[i])[0]
    return jnp.sum(x_btnh)

  return jax.grad(loss, argnums=(0, 1)), (jax.ShapeDtypeStruct((1, t, n, h), jnp.float32),
                                          jax.ShapeDtypeStruct((layers,), jnp.float32))


def _largest_value(jaxpr) -> int:
  """Elements of the largest array anywhere in a jaxpr's text (sub-jaxprs included)."""
  shapes = re.findall(r'\b(?:f32|bf16|f16|i32|bool)\[([0-9,]+)\]', str(jaxpr))
  return max(int(np.prod([int(d) for d in shape.split(',')])) for shape in shapes)


@pytest.mark.parametrize('remat', [False, True], ids=['plain', 'remat'])
def test_chunked_in_layer_scan_keeps_no_score_matrix(remat):
  """Regression: inside a scan over layers whose segment ids / positions are closed over (the
  Decoder's scan_layers=True), scan's loop-invariant hoisting used to precompute the block masks
  of every (query block, key block) pair, arrays of [8, 8, 1, 4, 1, 128, 128] at t = 1024."""
  n, t = 4, 1024
  grad, args = _layer_scan_grad(t, n, 32, 128, scan=True, remat=remat)
  # The largest legitimate values are the stacked per-layer residuals, layers * t * n * h =
  # t * t / 4 here; the hoisted masks were n * t * t each.
  assert _largest_value(jax.make_jaxpr(grad)(*args)) < t * t


def test_chunked_in_layer_scan_compiled_memory():
  """The compiled gradient of 2 scanned chunked layers at t = 2048 needs about as much temp
  memory as the same layers unrolled (before the fix: 186 MiB scanned against 14 unrolled and
  64 MiB per [n, t, t] float32 score matrix)."""
  n, t = 4, 2048
  temp = {}
  for scan in (True, False):
    grad, args = _layer_scan_grad(t, n, 32, 128, scan=scan)
    temp[scan] = jax.jit(grad).lower(*args).compile().memory_analysis().temp_size_in_bytes
  assert temp[True] < n * t * t * 4 / 2, temp
  assert temp[True] < 1.5 * temp[False], temp


def test_chunked_decoder_scan_layers_memory():
  """The whole Decoder, scan_layers=True, attention='chunked': the gradient's compiled temp
  memory stays below one [n, t, t] float32 score matrix and near the unrolled model's
  (before the fix: 53.7 MiB scanned, 7.0 MiB unrolled, 16 MiB per score matrix)."""
  t = 1024

  def temp_bytes(scan_layers):
    cfg = tiny_cfg(attention='chunked', attention_chunk=128, scan_layers=scan_layers)
    graphdef, params = nnx.split(Decoder(cfg, nnx.Rngs(0)))

    def loss(params, tokens_bt, positions_bt, segment_ids_bt):
      logits_btv, _ = nnx.merge(graphdef, params)(tokens_bt, positions_bt, segment_ids_bt)
      return jnp.mean(jax.nn.logsumexp(logits_btv, axis=-1))

    ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
    compiled = jax.jit(jax.grad(loss)).lower(params, ids, ids, ids).compile()
    return cfg, compiled.memory_analysis().temp_size_in_bytes

  cfg, scanned = temp_bytes(True)
  _, unrolled = temp_bytes(False)
  assert scanned < cfg.num_heads * t * t * 4, scanned
  assert scanned < 1.5 * unrolled, (scanned, unrolled)


@pytest.mark.parametrize('impl', ['cudnn', 'splash'])
def test_accelerator_kernels_refuse_cpu(impl):
  q, kk, v = qkv(1, 128, 128, 4, 2, 8, dtype=jnp.bfloat16)
  seg, pos = packed([128], 128)
  masks = {'q_segment_ids_bt': seg[None], 'kv_segment_ids_bs': seg[None],
           'q_positions_bt': pos[None], 'kv_positions_bs': pos[None]}
  backend = {'cudnn': 'NVIDIA GPU', 'splash': 'TPU'}[impl]
  with pytest.raises(RuntimeError, match=f"'{impl}' needs .*{backend}.*backend is 'cpu'"):
    run(impl, q, kk, v, masks)


@pytest.mark.parametrize('heads', ['mha', 'gqa'])
def test_splash_kernel_in_interpreter_matches_reference(heads):
  # The Pallas interpreter runs the TPU kernel on CPU: checks head layout, scaling, segment ids.
  n, k = HEADS[heads]
  q, kk, v = qkv(1, 256, 256, n, k, 64, seed=9)
  seg, pos = packed([100, 120], 256)
  masks = {'q_segment_ids_bt': seg[None], 'kv_segment_ids_bs': seg[None],
           'q_positions_bt': pos[None], 'kv_positions_bs': pos[None]}
  out = attn._splash(q, kk, v, seg[None], seg[None], interpret=True)
  np.testing.assert_allclose(out, run('reference', q, kk, v, masks), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_splash_kernel_in_interpreter_grads():
  q, kk, v = qkv(1, 256, 256, 4, 1, 64, seed=10)
  seg, pos = packed([100, 120], 256)
  masks = {'q_segment_ids_bt': seg[None], 'kv_segment_ids_bs': seg[None],
           'q_positions_bt': pos[None], 'kv_positions_bs': pos[None]}
  splash_grads = jax.grad(lambda *x: attn._splash(*x, seg[None], seg[None], interpret=True).sum(),
                          argnums=(0, 1, 2))(q, kk, v)
  ref_grads = jax.grad(lambda *x: run('reference', *x, masks).sum(), argnums=(0, 1, 2))(q, kk, v)
  for got, want in zip(splash_grads, ref_grads):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_splash_refuses_non_self_attention():
  q, kk, v = qkv(1, 128, 256, 4, 2, 8)
  seg = jnp.ones((1, 128), jnp.int32)
  with pytest.raises(ValueError, match='q_len == kv_len'):
    attn._splash(q, kk, v, seg, jnp.ones((1, 256), jnp.int32), interpret=True)


def test_resolve():
  assert attn.resolve('chunked', 10, 10) == 'chunked'
  assert attn.resolve('auto', 2048, 2048, backend='cpu') == 'xla'
  assert attn.resolve('auto', 4096, 4096, backend='cpu') == 'chunked'
  assert attn.resolve('auto', 2048, 8192, backend='cpu') == 'chunked'
  assert attn.resolve('auto', 1, 32768, backend='cpu') == 'xla'
  assert attn.resolve('auto', 4096, 4096, backend='gpu', dtype=jnp.bfloat16, head_dim=64) == 'cudnn'
  assert attn.resolve('auto', 2048, 2048, backend='gpu', dtype=jnp.float32) == 'xla'
  assert attn.resolve('auto', 4096, 4096, backend='gpu', dtype=jnp.float32) == 'chunked'
  assert attn.resolve('auto', 1, 4096, backend='gpu', dtype=jnp.bfloat16) == 'xla'
  assert attn.resolve('auto', 4096, 4096, backend='tpu') == 'splash'
  assert attn.resolve('auto', 1, 4096, backend='tpu') == 'xla'
  assert set(attn.IMPLEMENTATIONS) == {'reference', 'xla', 'chunked', 'cudnn', 'splash', 'auto'}
  with pytest.raises(ValueError, match="'flash' is not one of"):
    attn.resolve('flash', 1, 1)


def test_auto_logs_choice_once(caplog):
  q, kk, v = qkv(2, 37, 37, 4, 2, 8)
  masks = batch_masks(37)
  attn._logged_choices.clear()
  with caplog.at_level(logging.INFO, logger='model.attention'):
    out = run('auto', q, kk, v, masks)
    run('auto', q, kk, v, masks)
  assert [r.getMessage() for r in caplog.records if 'auto' in r.getMessage()] == [
      "attention auto -> xla (backend cpu, q (2, 37, 4, 8), kv (2, 37, 2, 8), float32)"]
  np.testing.assert_allclose(out, run('reference', q, kk, v, masks), atol=1e-5)


def test_bad_inputs_raise_clear_errors():
  q, kk, v = qkv(1, 8, 8, 4, 3, 8)
  ids = jnp.ones((1, 8), jnp.int32)
  masks = {'q_segment_ids_bt': ids, 'kv_segment_ids_bs': ids, 'q_positions_bt': ids,
           'kv_positions_bs': ids}
  with pytest.raises(ValueError, match=r'kv heads \(3\) must divide query heads \(4\)'):
    run('xla', q, kk, v, masks)
  q, kk, v = qkv(1, 8, 8, 4, 2, 8)
  with pytest.raises(ValueError, match=r'kv_positions_bs must have shape \(1, 8\)'):
    run('xla', q, kk, v, dict(masks, kv_positions_bs=jnp.ones((1, 9), jnp.int32)))
  with pytest.raises(ValueError, match='chunk_size must be positive'):
    run('chunked', q, kk, v, masks, chunk_size=0)


@pytest.mark.parametrize('impl', ['xla', 'chunked'])
def test_sharded_over_batch_and_heads(impl):
  # Batch over 'data' (2), query heads over 'tensor' (4), the 2 kv heads replicated.
  mesh = jax.make_mesh((2, 4), ('data', 'tensor'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  q, kk, v = qkv(2, 37, 37, 8, 2, 8, seed=11)
  masks = batch_masks(37)
  spec = jax.sharding.PartitionSpec
  heads = jax.sharding.NamedSharding(mesh, spec('data', None, 'tensor', None))
  kv_heads = jax.sharding.NamedSharding(mesh, spec('data', None, None, None))
  q = jax.device_put(q, heads)
  kk, v = jax.device_put(kk, kv_heads), jax.device_put(v, kv_heads)
  masks = {name: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec('data', None)))
           for name, x in masks.items()}
  loss, grads = loss_and_grads(impl, q, kk, v, masks)
  ref_loss, ref_grads = loss_and_grads('reference', *(np.asarray(x) for x in (q, kk, v)),
                                       {n: np.asarray(x) for n, x in masks.items()})
  np.testing.assert_allclose(loss, ref_loss, atol=1e-4, rtol=1e-5)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
