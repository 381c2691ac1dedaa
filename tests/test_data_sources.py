"""Sources: local corpora prepared as tfds array_record, tfds catalogued data, mixtures."""

import json
import os

import numpy as np
import pytest

from data import builders, pipeline, prepare
from data import config as data_config

VOCAB = 512


def _cfg(workdir, **entries):
  cfg = data_config.default_config()
  cfg.seq_len = 64
  cfg.tokenizer_docs = 400
  cfg.embedded_docs = 2_000
  cfg.embedded_eval_docs = 50
  cfg.tfds_data_dir = os.path.join(workdir, 'tfds')
  for name, entry in entries.items():
    cfg.sources[name] = entry
  cfg.source = ','.join(entries) or 'embedded'
  return cfg


@pytest.fixture
def corpus_dir(tmp_path):
  d = tmp_path / 'corpus'
  d.mkdir()
  paragraphs = [f'Paragraph {i} talks about apples and pears in some detail.' for i in range(40)]
  paragraphs += ['Paragraph 3 talks about apples and pears in some detail.'] * 3  # duplicates
  paragraphs += ['1234 5678 9999 0000', 'spam\nspam\nspam\nspam']  # low alpha, repeated lines
  (d / 'a.txt').write_text('\n\n'.join(paragraphs[:25]), encoding='utf-8')
  (d / 'b.txt').write_bytes('\n\n'.join(paragraphs[25:]).encode() + b'\n\nbroken \xff text\n')
  return d


def test_local_corpus_prepared_with_hygiene_counts(tmp_path, corpus_dir):
  workdir = str(tmp_path)
  entry = data_config.source_entry('local', path=str(corpus_dir / '*.txt'), name='fruit',
                                   eval_fraction=0.1)
  cfg = _cfg(workdir, fruit=entry)
  cfg.on_bad_input = 'skip'
  cfg.hygiene.update(dedup=True, min_alpha_ratio=0.5, max_repeated_line_ratio=0.5)
  it = pipeline.make_iterator(cfg, vocab_size=VOCAB, global_batch=2, workdir=workdir)
  built = it.build_stats['fruit']
  assert built['hygiene'] == {'kept': 40, 'duplicate': 3, 'low_alpha': 1, 'repeated_lines': 1}
  assert built['bad_input'] == {'invalid_utf8': 1}
  assert built['items'] == 36  # 40 kept, every 10th held out
  text = it.tokenizer.decode(next(it)['inputs'][0])
  assert 'apples and pears' in text and 'spam' not in text
  state = it.get_state()
  assert state['counts']['built']['fruit']['hygiene']['duplicate'] == 3
  assert state['counts']['read']['fruit']['items'] > 0
  ev = pipeline.make_iterator(cfg, vocab_size=VOCAB, global_batch=2, workdir=workdir,
                              split='eval')
  assert ev.build_stats['fruit']['items'] == 4
  # Bad input raises by default, naming file and line.
  cfg.on_bad_input = 'raise'
  with pytest.raises(Exception, match=r'b.txt:\d+: invalid UTF-8'):
    pipeline.make_iterator(cfg, vocab_size=VOCAB, global_batch=2, workdir=workdir)


def test_local_jsonl_and_prepare_cli(tmp_path, capsys):
  path = tmp_path / 'docs.jsonl'
  rows = [{'body': f'Document number {i} is here.'} for i in range(30)] + [{'title': 'x'}]
  path.write_text('\n'.join(json.dumps(r) for r in rows) + '\n', encoding='utf-8')
  args = ['local', '--path', str(path), '--data-dir', str(tmp_path / 'tfds'), '--file-format',
          'jsonl', '--text-field', 'body', '--on-bad-input', 'skip', '--eval-fraction', '0.1']
  prepare.main(args)
  report = json.loads(capsys.readouterr().out)
  assert report['splits'] == {'train': 27, 'eval': 3}
  assert report['bad_input'] == {'missing_field': 1}
  with pytest.raises(SystemExit):
    prepare.main(args[:-4] + ['--on-bad-input', 'raise'])
  assert f'{path}:31: field \'body\' is missing' in capsys.readouterr().err


@pytest.fixture
def shakespeare_manual_dir(tmp_path, shared_data):
  manual = tmp_path / 'manual'
  manual.mkdir()
  # The registered file name of tiny_shakespeare's download; the checksum is verified.
  os.symlink(shared_data / 'tinyshakespeare.txt', manual / 'input.txt')
  return str(manual)


def test_tiny_shakespeare_through_tfds(tmp_path, shakespeare_manual_dir):
  workdir = str(tmp_path)
  entry = data_config.source_entry('tfds', name='tiny_shakespeare', doc_unit='paragraph',
                                   manual_dir=shakespeare_manual_dir)
  cfg = _cfg(workdir, shakespeare=entry)
  it = pipeline.make_iterator(cfg, vocab_size=VOCAB, global_batch=4, workdir=workdir)
  assert it.build_stats['shakespeare']['records'] == 1  # the whole text is one record
  assert it.build_stats['shakespeare']['items'] > 5_000  # cut into speeches
  batch = next(it)
  texts = [it.tokenizer.decode(row) for row in batch['inputs']]
  assert len(set(texts)) == 4
  # Read back through tfds's own catalogued builder: the train split is 90% of the file.
  src = builders.tfds_source('tiny_shakespeare', 'train', cfg.tfds_data_dir, prepare=False)
  text = (tmp_path / 'manual' / 'input.txt').read_text(encoding='utf-8')
  assert src[0]['text'].decode('utf-8') == text[:int(len(text) * 0.9)]
  assert any(t.split('\n')[0].rstrip(':') in text for t in texts)
  ev = pipeline.make_iterator(cfg, vocab_size=VOCAB, global_batch=4, workdir=workdir,
                              split='eval')
  assert ev.build_stats['shakespeare']['items'] < it.build_stats['shakespeare']['items'] / 10


def test_unprepared_tfds_dataset_says_what_to_run(tmp_path):
  with pytest.raises(builders.PrepareError, match='python -m data.prepare tfds'):
    builders.tfds_source('tiny_shakespeare', 'train', str(tmp_path), prepare=False)


def test_mixture_follows_weights_and_counts_per_source(tmp_path, corpus_dir):
  workdir = str(tmp_path)
  cfg = _cfg(workdir,
             embedded=data_config.source_entry('embedded', weight=3.0),
             fruit=data_config.source_entry('local', path=str(corpus_dir / 'a.txt'),
                                            weight=1.0))
  it = pipeline.make_iterator(cfg, vocab_size=VOCAB, global_batch=4, workdir=workdir)
  for _ in range(30):
    next(it)
  counts = it.counts()
  share = counts['embedded']['items'] / (counts['embedded']['items'] + counts['fruit']['items'])
  assert 0.65 < share < 0.85, counts
  state = it.get_state()
  expected = next(it)
  resumed = pipeline.make_iterator(cfg, vocab_size=VOCAB, global_batch=4, workdir=workdir)
  resumed.set_state(json.loads(json.dumps(state)))
  assert resumed.counts() == counts
  got = next(resumed)
  assert all(np.array_equal(v, got[k]) for k, v in expected.items())


def test_lazy_hygiene_on_read_sources_is_counted(tmp_path):
  workdir = str(tmp_path)
  cfg = _cfg(workdir)
  cfg.hygiene.min_chars = 200  # drops the shorter generated documents as they are read
  it = pipeline.make_iterator(cfg, vocab_size=VOCAB, global_batch=2, workdir=workdir)
  for _ in range(5):
    next(it)
  counts = it.counts()['embedded']
  assert counts['skipped_too_short'] > 0 and counts['items'] > 0


def test_bad_source_entries(tmp_path):
  workdir = str(tmp_path)
  with pytest.raises(data_config.DataConfigError, match=r'sources.x.kind'):
    pipeline.make_iterator(_cfg(workdir, x=data_config.source_entry('s3')), vocab_size=VOCAB,
                           global_batch=2, workdir=workdir)
  with pytest.raises(data_config.DataConfigError, match=r'sources.x.path'):
    pipeline.make_iterator(_cfg(workdir, x=data_config.source_entry('local')),
                           vocab_size=VOCAB, global_batch=2, workdir=workdir)
  with pytest.raises(data_config.DataConfigError, match=r'unknown key'):
    pipeline.make_iterator(_cfg(workdir, x=data_config.source_entry('tfds', name='t', pth='')),
                           vocab_size=VOCAB, global_batch=2, workdir=workdir)
  with pytest.raises(data_config.DataConfigError, match=r'sources.x.weight'):
    pipeline.make_iterator(_cfg(workdir, x=data_config.source_entry('embedded', weight=0)),
                           vocab_size=VOCAB, global_batch=2, workdir=workdir)
