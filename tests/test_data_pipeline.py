"""The packed-batch iterator: contract, determinism, exact resume, process sharding, eval split."""

import json

import numpy as np
import pytest

from data import config as data_config
from data import packing, pipeline, sources

VOCAB = 512


def _cfg(**overrides):
  cfg = data_config.default_config()
  cfg.seq_len = 64
  cfg.tokenizer_docs = 600
  cfg.embedded_docs = 2_000
  cfg.embedded_eval_docs = 100
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('workdir'))


def _make(workdir, cfg=None, **kw):
  kw.setdefault('global_batch', 4)
  return pipeline.make_iterator(cfg or _cfg(), vocab_size=VOCAB, workdir=workdir, **kw)


def _equal(a, b):
  return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_batch_contract(workdir):
  it = _make(workdir)
  batch = next(it)
  expect = {'inputs': np.int32, 'targets': np.int32, 'positions': np.int32,
            'segment_ids': np.int32, 'loss_mask': np.float32}
  assert {k: v.dtype for k, v in batch.items()} == expect
  assert all(v.shape == (4, 64) for v in batch.values())
  assert batch['inputs'].max() < it.tokenizer.vocab_size <= VOCAB
  assert batch['loss_mask'].mean() > 0.99  # concat packing: padding-free rows
  # Each row starts with a BOS or continues a cut document; targets are shifted inputs.
  same = batch['segment_ids'][:, 1:] == batch['segment_ids'][:, :-1]
  assert np.array_equal(batch['targets'][:, :-1][same], batch['inputs'][:, 1:][same])
  text = it.tokenizer.decode(batch['inputs'][0])
  assert len(text) > 50


def test_deterministic_and_seeded(workdir):
  a = [next(_make(workdir)) for _ in range(1)][0]
  b = next(_make(workdir))
  c = next(_make(workdir, seed=1))
  assert _equal(a, b)
  assert not np.array_equal(a['inputs'], c['inputs'])


@pytest.mark.parametrize('policy', packing.POLICIES)
def test_resume_gives_identical_batches(workdir, policy):
  cfg = _cfg(packing=policy, seq_len=48)
  it = _make(workdir, cfg)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  # With 48-token rows most rows end inside a document: the state must carry the cut.
  assert any(s['offset'] >= 0 for s in state['grain']['parents'])
  expected = [next(it) for _ in range(4)]
  resumed = _make(workdir, cfg)
  resumed.set_state(state)
  for batch in expected:
    assert _equal(batch, next(resumed))
  # Restoring into the same iterator also rewinds it.
  it.set_state(state)
  assert _equal(expected[0], next(it))


def test_resume_across_epochs(workdir):
  cfg = _cfg(embedded_docs=12, seq_len=32)
  it = _make(workdir, cfg, global_batch=2)
  seen = [next(it) for _ in range(20)]  # several passes over 12 documents
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = _make(workdir, cfg, global_batch=2)
  resumed.set_state(state)
  assert all(_equal(e, next(resumed)) for e in expected)
  assert len({s['inputs'].tobytes() for s in seen}) > 1


def test_process_shards_make_the_global_batch(workdir):
  whole = _make(workdir, global_batch=4)
  shards = [_make(workdir, global_batch=4, process_index=p, process_count=2) for p in range(2)]
  for _ in range(3):
    batch = next(whole)
    parts = [next(s) for s in shards]
    assert all(p['inputs'].shape == (2, 64) for p in parts)
    for k in batch:
      assert np.array_equal(batch[k], np.concatenate([p[k] for p in parts]))


def test_eval_split_is_held_out_and_fixed(workdir):
  cfg = _cfg()
  train_docs = sources.build('embedded', cfg.sources.embedded, cfg, 'train', workdir).items
  eval_docs = sources.build('embedded', cfg.sources.embedded, cfg, 'eval', workdir).items
  assert len(eval_docs) == 100
  # Separate draws of the generators; only a few short templated texts can coincide.
  overlap = {train_docs[i] for i in range(len(train_docs))} & {eval_docs[i] for i in range(100)}
  assert len(overlap) <= 3
  a = next(_make(workdir, split='eval'))
  b = next(_make(workdir, split='eval'))
  assert _equal(a, b)
  assert not np.array_equal(a['inputs'], next(_make(workdir))['inputs'])


def test_tokenizer_is_cached_in_workdir(workdir):
  first = _make(workdir).tokenizer.path
  assert first.startswith(workdir) and _make(workdir).tokenizer.path == first
  bpe = _make(workdir, _cfg(tokenizer_type='bpe')).tokenizer.path
  assert bpe != first
  given = _make(workdir, _cfg(tokenizer=first)).tokenizer.path
  assert given == first


def test_errors_name_the_config_key(workdir):
  with pytest.raises(data_config.DataConfigError, match='config.data.source'):
    _make(workdir, _cfg(source='nope'))
  with pytest.raises(data_config.DataConfigError, match='sources.embedded_preference.format'):
    _make(workdir, _cfg(source='embedded,embedded_preference'))
  with pytest.raises(data_config.DataConfigError, match='config.data.packing'):
    _make(workdir, _cfg(packing='best'))
  with pytest.raises(data_config.DataConfigError, match='config.data.tokenizer_type'):
    _make(workdir, _cfg(tokenizer_type='wordpiece'))
  with pytest.raises(data_config.DataConfigError, match='multiple of the process count'):
    _make(workdir, global_batch=3, process_count=2)
  with pytest.raises(data_config.DataConfigError, match='split'):
    _make(workdir, split='validation')
  with pytest.raises(data_config.DataConfigError, match='on_bad_input'):
    _make(workdir, _cfg(on_bad_input='ignore'))
  tok_path = _make(workdir).tokenizer.path
  with pytest.raises(data_config.DataConfigError, match='config.data.tokenizer'):
    pipeline.make_iterator(_cfg(tokenizer=tok_path), vocab_size=300, global_batch=4,
                           workdir=workdir)


def test_state_from_another_pipeline_is_refused(workdir):
  state = _make(workdir, global_batch=4).get_state()
  other = _make(workdir, global_batch=2)
  with pytest.raises(ValueError, match='differently built'):
    other.set_state(state)
  with pytest.raises(ValueError, match='unknown format'):
    other.set_state({'version': 99})
