"""Packing invariants: segments, restarting positions, no cross-document targets, masks."""


import numpy as np
import pytest

from data import packing

BOS, EOS = 1, 2


def pack_documents(docs_ids, seq_len, *, bos_id, eos_id, policy='concat', pad_id=0):
  """Packs tokenised documents (lists of ids without BOS/EOS): dict of [N, T] arrays."""
  examples = (packing.lm_example(np.concatenate([[bos_id], np.asarray(ids, np.int32), [eos_id]]))
              for ids in docs_ids)
  return packing.pack_examples(examples, seq_len, policy, pad_id)


def _docs(n, max_len, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(10, 1000, size=rng.integers(0, max_len)).astype(np.int32) for _ in range(n)]


def _segments(rows):
  """Yields (row, segment id, slice) for every segment of every row."""
  for r, seg in enumerate(rows['segment_ids']):
    for s in np.unique(seg[seg > 0]):
      idx = np.flatnonzero(seg == s)
      assert np.all(np.diff(idx) == 1), 'a segment must be contiguous'
      yield r, s, slice(idx[0], idx[-1] + 1)


@pytest.mark.parametrize('policy', packing.POLICIES)
@pytest.mark.parametrize('seq_len', [1, 7, 64])
def test_invariants(policy, seq_len):
  docs = _docs(60, 90)
  rows = pack_documents(docs, seq_len, bos_id=BOS, eos_id=EOS, policy=policy)
  assert set(rows) == set(packing.FEATURES)
  for k in packing.FEATURES:
    assert rows[k].shape[1] == seq_len
    assert rows[k].dtype == (np.float32 if k == 'loss_mask' else np.int32)
  seg, pos, mask = rows['segment_ids'], rows['positions'], rows['loss_mask']
  # Padding: segment 0, mask 0, pad tokens, and only at the end of a row.
  pad = seg == 0
  assert np.all(mask[pad] == 0) and np.all(mask[~pad] == 1)
  assert np.all(rows['inputs'][pad] == 0) and np.all(rows['targets'][pad] == 0)
  for row in pad:
    assert not np.any(np.diff(row.astype(int)) < 0), 'padding only at the end of a row'
  # Segment ids run 1, 2, 3, ... from the start of the row.
  for row in seg:
    ids = row[row > 0]
    assert ids.size == 0 or (ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1))
  # Positions restart at 0 in every segment; inside a segment, targets are the next inputs.
  for r, _, sl in _segments(rows):
    assert np.array_equal(pos[r, sl], np.arange(sl.stop - sl.start))
    assert np.array_equal(rows['targets'][r, sl][:-1], rows['inputs'][r, sl][1:])
  # The token stream of all segments, glued back per document, is each document exactly.
  rebuilt = _rebuild(rows)
  assert rebuilt == [[BOS] + d.tolist() + [EOS] for d in docs]


def _rebuild(rows):
  """Glues segments back into documents: a segment whose first input is BOS starts one."""
  out = []
  for r, _, sl in _segments(rows):
    inputs, targets = rows['inputs'][r, sl].tolist(), rows['targets'][r, sl].tolist()
    if inputs[0] == BOS and (not out or out[-1][-1] == EOS):
      out.append([BOS])
    out[-1].extend(targets)
  return out


def test_targets_never_cross_documents():
  docs = _docs(40, 30, seed=1)
  rows = pack_documents(docs, 50, bos_id=BOS, eos_id=EOS)
  for r, _, sl in _segments(rows):
    targets = rows['targets'][r, sl]
    # EOS only ever appears as the last target of a segment, BOS never as a target.
    assert BOS not in targets
    assert np.all(targets[:-1] != EOS)


def test_pad_policy_keeps_short_documents_whole():
  docs = _docs(50, 40, seed=2)
  rows = pack_documents(docs, 48, bos_id=BOS, eos_id=EOS, policy='pad')
  for r, _, sl in _segments(rows):
    assert rows['inputs'][r, sl][0] == BOS and rows['targets'][r, sl][-1] == EOS
  concat = pack_documents(docs, 48, bos_id=BOS, eos_id=EOS, policy='concat')
  assert concat['loss_mask'].shape[0] <= rows['loss_mask'].shape[0]
  assert np.sum(concat['loss_mask'] == 0) < 48, 'concat pads only the final row'


def test_long_document_is_cut_into_restarting_chunks():
  doc = np.arange(10, 110, dtype=np.int32)  # 100 tokens -> 101 shifted pairs
  for policy in packing.POLICIES:
    rows = pack_documents([doc], 32, bos_id=BOS, eos_id=EOS, policy=policy)
    assert rows['inputs'].shape == (4, 32)
    assert np.all(rows['segment_ids'][:3] == 1)
    assert np.array_equal(rows['positions'][1], np.arange(32))
    assert rows['inputs'][1, 0] == rows['targets'][0, -1]
    assert rows['loss_mask'].sum() == 101


def test_weights_align_with_targets():
  ids = np.array([BOS, 5, 6, 7, 8, EOS], np.int32)
  weights = np.array([0, 0, 0, 1, 1, 1], np.float32)  # learn 7, 8 and EOS
  ex = packing.lm_example(ids, weights)
  assert ex['targets'][ex['weights'] == 1].tolist() == [7, 8, EOS]
  rows = packing.pack_examples([ex, ex], 8)
  learned = rows['targets'][rows['loss_mask'] == 1].tolist()
  assert learned == [7, 8, EOS, 7, 8, EOS]
  with pytest.raises(ValueError, match='weights shape'):
    packing.lm_example(ids, weights[:-1])
  with pytest.raises(ValueError, match='at least 2 ids'):
    packing.lm_example([BOS])


def test_bad_arguments():
  with pytest.raises(ValueError, match='policy'):
    packing.RowPacker(8, 'best')
  with pytest.raises(ValueError, match='positive'):
    packing.RowPacker(0)
  empty = pack_documents([], 8, bos_id=BOS, eos_id=EOS)
  assert empty['inputs'].shape == (0, 8)


def test_32k_rows_pack_every_token():
  """32,768-token rows (the Mixtral context); speed is measured in benchmarks/bench_data.py."""
  seq_len = 32_768
  docs = _docs(2_000, 400, seed=3)  # ~400k tokens: about 12 rows
  rows = pack_documents(docs, seq_len, bos_id=BOS, eos_id=EOS)
  n_tokens = sum(len(d) + 1 for d in docs)
  assert rows['loss_mask'].sum() == n_tokens
  assert rows['positions'].max() < 400 + 1


def test_loss_of_packed_rows_equals_loss_of_documents_one_by_one():
  """The packer's rows (segment ids, positions, masks) through the model: the summed token loss
  of the packed corpus is the sum of each document's loss computed alone."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from model.transformer import Decoder
  from tests.util import tiny_cfg
  from train.step import token_nll

  cfg = tiny_cfg(vocab_size=64)
  model = Decoder(cfg, nnx.Rngs(0))
  docs = [d % 60 + 3 for d in _docs(7, 9, seed=5)]  # Ids clear of BOS=1 / EOS=2, inside the vocab.

  def loss_sum(rows):
    logits, _ = model(jnp.asarray(rows['inputs']), jnp.asarray(rows['positions']),
                      jnp.asarray(rows['segment_ids']))
    return float(jnp.sum(token_nll(logits, jnp.asarray(rows['targets'])) * rows['loss_mask']))

  packed = pack_documents(docs, 24, bos_id=1, eos_id=2, policy='pad')
  assert packed['inputs'].shape[0] < len(docs)  # Several documents share rows.
  alone = sum(loss_sum(pack_documents([d], 24, bos_id=1, eos_id=2, policy='pad')) for d in docs)
  np.testing.assert_allclose(loss_sum(packed), alone, rtol=1e-5)
