"""Hygiene steps and the bad-input policy of the readers, each counted."""

import gzip
import json

import pytest

from data import hygiene, readers


def _cfg(**kw):
  c = hygiene.default_config()
  c.update(kw)
  return c


def test_steps_are_off_by_default():
  h = hygiene.Hygiene()
  for text in ['x', '1234 5678', 'a\na\na\na', 'e\u0301']:
    assert h.check(text) == text
  assert h.check('x') == 'x'  # no dedup by default
  assert h.check('   \n') is None
  assert h.counts == {'kept': 5, 'empty': 1}


def test_normalisation():
  assert hygiene.Hygiene(_cfg(normalize='NFC')).check('e\u0301') == '\u00e9'
  assert hygiene.Hygiene(_cfg(normalize='NFKC')).check('ﬁ ＡＢ') == 'fi AB'
  with pytest.raises(ValueError, match='hygiene.normalize'):
    hygiene.Hygiene(_cfg(normalize='NFX'))


def test_dedup_after_normalisation():
  h = hygiene.Hygiene(_cfg(normalize='NFC', dedup=True))
  kept = [h.check(t) for t in ['caf\u00e9', 'cafe\u0301', 'other', 'caf\u00e9']]
  assert kept == ['caf\u00e9', None, 'other', None]
  assert h.counts == {'kept': 2, 'duplicate': 2}


def test_quality_filters():
  h = hygiene.Hygiene(_cfg(min_chars=5, max_chars=40, min_alpha_ratio=0.5,
                           max_repeated_line_ratio=0.3))
  texts = {'tiny': 'too_short', 'x' * 41: 'too_long', '12345 67890 !!': 'low_alpha',
           'same\nsame\nsame\nother': 'repeated_lines', 'A fine line of text.': None}
  for text, reason in texts.items():
    assert h.filter(text)[1] == reason, text
  assert hygiene.alpha_ratio('ab 12') == 0.5
  assert hygiene.repeated_line_ratio('a\nb\na\n\na') == 0.5


def test_jsonl_bad_input_raise_names_file_and_line(tmp_path):
  path = tmp_path / 'data.jsonl'
  path.write_bytes(b'{"text": "good"}\n\n{"text": broken\n')
  with pytest.raises(readers.BadInputError, match=f'{path}:3: invalid JSON'):
    list(readers.iter_jsonl_text(str(path), 'text', readers.BadInput('raise')))


def test_jsonl_bad_input_skip_counts(tmp_path):
  path = tmp_path / 'data.jsonl.gz'
  lines = [json.dumps({'text': 'good one'}).encode(), b'{"text": oops}', b'[1, 2]',
           json.dumps({'other': 'x'}).encode(), json.dumps({'text': 3}).encode(),
           json.dumps({'text': '  '}).encode(), b'{"text": "bad \xff utf8"}',
           json.dumps({'meta': {'body': 'nested'}}).encode()]
  with gzip.open(path, 'wb') as f:
    f.write(b'\n'.join(lines) + b'\n')
  bad = readers.BadInput('skip')
  docs = list(readers.iter_jsonl_text(str(path), 'text', bad))
  assert docs == [(f'{path}:1', 'good one')]
  assert bad.counts == {'invalid_json': 2, 'missing_field': 3, 'empty': 1, 'invalid_utf8': 1}
  nested = list(readers.iter_jsonl_text(str(path), 'meta.body', readers.BadInput('skip')))
  assert nested == [(f'{path}:8', 'nested')]


def test_text_units_and_bad_input(tmp_path):
  (tmp_path / 'a.txt').write_bytes(b'p1 l1\np1 l2\n\n\np2 \xff bad\np2 l2\n\np3\n')
  (tmp_path / 'b.txt').write_bytes(b'')
  pattern = str(tmp_path / '*.txt')
  bad = readers.BadInput('skip')
  assert [d for _, d in readers.iter_text(pattern, 'paragraph', bad)] == ['p1 l1\np1 l2', 'p3']
  assert [w for w, _ in readers.iter_text(pattern, 'line', bad)] == [
      f'{tmp_path}/a.txt:{n}' for n in (1, 2, 6, 8)]
  assert list(readers.iter_text(pattern, 'file', bad)) == []  # a.txt broken, b.txt empty
  assert bad.counts == {'invalid_utf8': 3, 'empty': 1}
  with pytest.raises(readers.BadInputError, match=r'a.txt:5: invalid UTF-8'):
    list(readers.iter_text(pattern, 'paragraph', readers.BadInput('raise')))
  with pytest.raises(readers.BadInputError, match=r'b.txt:1: empty file'):
    list(readers.iter_text(str(tmp_path / 'b.txt'), 'file', readers.BadInput('raise')))
  with pytest.raises(FileNotFoundError, match='matches no file'):
    list(readers.iter_text(str(tmp_path / 'none*.txt'), 'line', bad))
  with pytest.raises(ValueError, match='on_bad_input'):
    readers.BadInput('ignore')
