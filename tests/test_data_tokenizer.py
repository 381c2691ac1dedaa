"""SentencePiece training, exact round trips, special ids, caching and the CLI."""

import os

import pytest

from data import corpus
from data import tokenizer as tokenizer_lib

SAMPLES = [
    '',
    ' ',
    'plain text',
    '  leading and trailing spaces  ',
    'runs   of    spaces\tand\t\ttabs\n\nand\r\nCRLF\n',
    '\n\n\n',
    'emoji 😀🎉👩‍👩‍👧 and flags 🇯🇵',
    '日本語のテキストと中文文本와 한국어',
    'Ελληνικά, русский, עברית, العربية, हिन्दी',
    'combining e\u0301 vs é, ligature ﬁ, full-width ＡＢＣ１２３',
    'zero\u200bwidth, nbsp\u00a0here, bom\ufeff, nul\x00, bell\x07',
    '12345678901234567890 and 3.14159 and -42',
    '<|user|> typed by a user, <s> and </s> as text, <pad> <unk>',
    '▁ the metaspace character itself ▁▁',
]


@pytest.fixture(scope='module', params=tokenizer_lib.MODEL_TYPES)
def tok(request, tmp_path_factory):
  docs = corpus.documents(seed=0, num_docs=800)
  prefix = tmp_path_factory.mktemp(request.param) / 'tok'
  return tokenizer_lib.train(docs, 400, request.param, prefix)


def test_round_trip_wide_unicode(tok):
  for text in SAMPLES + corpus.documents(seed=5, num_docs=20):
    ids = tok.encode(text)
    assert tok.decode(ids) == text, (text, [tok.id_to_piece(i) for i in ids])
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_special_ids(tok):
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
  markers = [tok.special_id(m) for m in tokenizer_lib.CHAT_MARKERS]
  assert len(set(markers)) == len(markers) and min(markers) > 3
  # Text never turns into a special id: only a template can insert them.
  for text in ['<|user|>', '<s></s><pad>', ''.join(tokenizer_lib.CHAT_MARKERS)]:
    ids = tok.encode(text)
    assert not set(ids) & set(markers + [0, 1, 2, 3]), ids
  assert tok.vocab_size <= 400
  assert tok.piece_id('definitely-not-a-piece') is None
  with pytest.raises(tokenizer_lib.TokenizerError, match='no piece'):
    tok.special_id('<|tool|>')


def test_digits_are_split(tok):
  pieces = [tok.id_to_piece(i) for i in tok.encode('2024')]
  assert [p.replace('▁', '') for p in pieces] == ['2', '0', '2', '4']


def test_train_or_load_caches(tmp_path):
  docs = corpus.documents(seed=1, num_docs=300)
  first = tokenizer_lib.train_or_load(docs, 350, 'bpe', tmp_path / 'cache')
  mtime = os.path.getmtime(first.path)
  again = tokenizer_lib.train_or_load(['unused'], 350, 'bpe', str(tmp_path / 'cache.model'))
  assert again.path == first.path and os.path.getmtime(again.path) == mtime
  assert again.encode('The capital of Peru is Lima.') == first.encode('The capital of Peru is Lima.')
  with pytest.raises(tokenizer_lib.TokenizerError, match='above the 300 asked for'):
    tokenizer_lib.train_or_load(docs, 300, 'bpe', tmp_path / 'cache')


def test_training_is_deterministic(tmp_path):
  docs = corpus.documents(seed=2, num_docs=300)
  a = tokenizer_lib.train(docs, 350, 'unigram', tmp_path / 'a')
  b = tokenizer_lib.train(docs, 350, 'unigram', tmp_path / 'b')
  assert [a.id_to_piece(i) for i in range(a.vocab_size)] == [
      b.id_to_piece(i) for i in range(b.vocab_size)]
  assert [a.encode(d) for d in docs[:50]] == [b.encode(d) for d in docs[:50]]


def test_bad_arguments(tmp_path):
  with pytest.raises(tokenizer_lib.TokenizerError, match='not one of'):
    tokenizer_lib.train(['x'], 500, 'wordpiece', tmp_path / 't')
  with pytest.raises(tokenizer_lib.TokenizerError, match='below'):
    tokenizer_lib.train(['x'], 100, 'bpe', tmp_path / 't')
  with pytest.raises(tokenizer_lib.TokenizerError, match='does not exist'):
    tokenizer_lib.Tokenizer(tmp_path / 'missing.model')
  bad = tmp_path / 'bad.model'
  bad.write_bytes(b'not a model')
  with pytest.raises(tokenizer_lib.TokenizerError, match='cannot be loaded'):
    tokenizer_lib.Tokenizer(bad)


def test_cli(tmp_path, capsys):
  for i, doc in enumerate(corpus.documents(seed=3, num_docs=200)):
    (tmp_path / f'doc{i}.txt').write_text(doc, encoding='utf-8')
  out = tmp_path / 'out' / 'spm'
  tokenizer_lib.main(['train', '--input', str(tmp_path / 'doc*.txt'), '--vocab-size', '400',
                      '--model-type', 'bpe', '--out', str(out)])
  assert 'wrote' in capsys.readouterr().out
  tok = tokenizer_lib.Tokenizer(str(out) + '.model')
  assert tok.vocab_size <= 400 and tok.decode(tok.encode('Hello, Bob!\n')) == 'Hello, Bob!\n'
  with pytest.raises(SystemExit):
    tokenizer_lib.main(['train', '--input', str(tmp_path / 'nothing*.txt'), '--vocab-size',
                        '400', '--out', str(out)])
  (tmp_path / 'latin1.txt').write_bytes(b'caf\xe9')
  with pytest.raises(SystemExit):
    tokenizer_lib.main(['train', '--input', str(tmp_path / 'latin1.txt'), '--vocab-size',
                        '400', '--out', str(out)])
  assert 'latin1.txt:1: invalid UTF-8' in capsys.readouterr().err


def test_loads_llama_style_models(tmp_path):
  """A model laid out like Llama's/Mistral's: UNK=0, BOS=1, EOS=2, no PAD, no chat markers."""
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  lines = [line for d in corpus.documents(seed=4, num_docs=300) for line in d.split('\n')]
  spm.SentencePieceTrainer.Train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / 'l'),
                                 vocab_size=400, model_type='bpe', byte_fallback=True,
                                 unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
  tok = tokenizer_lib.Tokenizer(tmp_path / 'l.model')
  assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 0)
  assert tok.decode(tok.encode('The capital of Peru is Lima.')) == 'The capital of Peru is Lima.'
  with pytest.raises(tokenizer_lib.TokenizerError, match="no piece '<\\|user\\|>'"):
    tok.special_id('<|user|>')
