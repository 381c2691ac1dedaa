"""SentencePiece tokenizers: training (unigram or BPE), caching, and a small wrapper class.

Trained models round-trip any UTF-8 text, `decode(encode(x)) == x` (identity normalisation, no
whitespace collapsing or dummy prefix, byte fallback), and split digits. Their ids: PAD=0, BOS=1,
EOS=2, UNK=3, then the `CHAT_MARKERS` as control symbols (never produced by encoding text, only
inserted by id by a chat template, dropped by `decode`); a newline is its own piece. `Tokenizer`
also loads models such as Llama's (UNK=0, no PAD: `pad_id` is 0, only under a zero loss mask).

CLI: python -m data.tokenizer train --input 'texts/*.txt' --vocab-size 8000 --out /tmp/tok
"""

import argparse
import hashlib
import os
import pathlib
import tempfile
from typing import Iterable, Sequence

import sentencepiece as spm

from data import readers

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
CHAT_MARKERS = ('<|system|>', '<|user|>', '<|assistant|>', '<|end|>')
NEWLINE = '\n'
METASPACE = '\u2581'  # SentencePiece's stand-in for a space.
MODEL_TYPES = ('unigram', 'bpe')


class TokenizerError(ValueError):
  """A tokenizer that cannot be trained or used as asked; the message says why."""


class Tokenizer:
  """A loaded SentencePiece model with the ids the data pipeline needs."""

  def __init__(self, model_path: str | os.PathLike):
    self.path = str(model_path)
    if not os.path.isfile(self.path):
      raise TokenizerError(f'tokenizer model {self.path} does not exist')
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(self.path)
    except (OSError, RuntimeError) as e:
      raise TokenizerError(f'tokenizer model {self.path} cannot be loaded: {e}') from e
    self.vocab_size, self.unk_id = self._sp.GetPieceSize(), self._sp.unk_id()
    self.pad_id = max(self._sp.pad_id(), 0)  # 0 where the model has no PAD.
    byte_ids = [self.piece_id(f'<0x{b:02X}>') for b in METASPACE.encode('utf-8')]
    self._metaspace_ids = byte_ids if None not in byte_ids else []

  @property
  def bos_id(self) -> int:
    return self._required(self._sp.bos_id(), 'BOS')

  @property
  def eos_id(self) -> int:
    return self._required(self._sp.eos_id(), 'EOS')

  def _required(self, token_id: int, name: str) -> int:
    if token_id < 0:
      raise TokenizerError(f'tokenizer model {self.path} has no {name} token')
    return token_id

  def piece_id(self, piece: str) -> int | None:
    """The id of `piece`, or None when the vocabulary lacks it."""
    token_id = self._sp.PieceToId(piece)
    return None if token_id == self.unk_id and piece != self._sp.IdToPiece(token_id) else token_id

  def special_id(self, piece: str) -> int:
    """The id of a special piece such as '<|user|>'; an error naming the model if absent."""
    token_id = self.piece_id(piece)
    if token_id is None:
      raise TokenizerError(f'tokenizer model {self.path} has no piece {piece!r} '
                           f'(train one with data.tokenizer to get the chat markers)')
    return token_id

  def encode(self, text: str) -> list[int]:
    if METASPACE not in text or not self._metaspace_ids:
      return self._sp.EncodeAsIds(text)
    # A literal U+2581 would decode as a space: spell it with its three UTF-8 byte pieces.
    ids = []
    for i, part in enumerate(text.split(METASPACE)):
      if i:
        ids.extend(self._metaspace_ids)
      if part:
        ids.extend(self._sp.EncodeAsIds(part))
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.DecodeIds([int(i) for i in ids])

  def id_to_piece(self, token_id: int) -> str:
    return self._sp.IdToPiece(int(token_id))


def _lines(docs: Iterable[str], max_chars: int) -> Iterable[str]:
  """Training sentences: SentencePiece reads one line at a time, newlines are pieces of ours;
  longer lines are cut into `max_chars` pieces (SentencePiece would drop them)."""
  for doc in docs:
    for line in doc.split(NEWLINE):
      for i in range(0, len(line) if line.strip() else 0, max_chars):
        yield line[i:i + max_chars]


def train(docs: Iterable[str], vocab_size: int, model_type: str, prefix: str | os.PathLike,
          *, max_sentence_length: int = 16_384) -> Tokenizer:
  """Trains a model on `docs` and writes `prefix.model` / `prefix.vocab` atomically; it has at
  most `vocab_size` pieces (fewer when the text cannot support more)."""
  if model_type not in MODEL_TYPES:
    raise TokenizerError(f'tokenizer type {model_type!r} is not one of {MODEL_TYPES}')
  min_vocab = 256 + 4 + len(CHAT_MARKERS) + 1 + 16
  if vocab_size < min_vocab:
    raise TokenizerError(f'vocab size {vocab_size} is below {min_vocab}: 256 byte pieces, '
                         f'{4 + len(CHAT_MARKERS) + 1} special pieces and some text pieces')
  prefix = pathlib.Path(prefix)
  prefix.parent.mkdir(parents=True, exist_ok=True)
  spm.set_random_generator_seed(0)
  with tempfile.TemporaryDirectory(dir=prefix.parent) as tmp:
    tmp_prefix = os.path.join(tmp, 'model')
    try:
      spm.SentencePieceTrainer.Train(
          sentence_iterator=iter(_lines(docs, max_sentence_length // 4)),  # <= 4 bytes a char
          model_prefix=tmp_prefix, model_type=model_type, vocab_size=vocab_size,
          hard_vocab_limit=False,  # A small corpus may support fewer pieces; never more.
          character_coverage=0.9995, byte_fallback=True, normalization_rule_name='identity',
          remove_extra_whitespaces=False, add_dummy_prefix=False,
          allow_whitespace_only_pieces=True, split_digits=True, split_by_whitespace=True,
          max_sentence_length=max_sentence_length, input_sentence_size=0,
          shuffle_input_sentence=False,
          pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
          pad_piece='<pad>', bos_piece='<s>', eos_piece='</s>', unk_piece='<unk>',
          control_symbols=list(CHAT_MARKERS), user_defined_symbols=[NEWLINE],
          num_threads=1,  # One thread: the same model on every host.
          minloglevel=2)
    except RuntimeError as e:
      raise TokenizerError(f'training a {model_type} tokenizer of vocab size {vocab_size} '
                           f'failed: {e}') from e
    for ext in ('.vocab', '.model'):  # .model last: its presence marks a finished training.
      os.replace(tmp_prefix + ext, str(prefix) + ext)
  return Tokenizer(str(prefix) + '.model')


def train_or_load(docs: Iterable[str], vocab_size: int, model_type: str,
                  path: str | os.PathLike) -> Tokenizer:
  """Loads `path` (a .model file or a prefix) if trained before, else trains it on `docs`."""
  prefix = str(path).removesuffix('.model')
  if os.path.isfile(prefix + '.model'):
    tok = Tokenizer(prefix + '.model')
    if tok.vocab_size > vocab_size:
      raise TokenizerError(f'cached tokenizer {prefix}.model has vocab size {tok.vocab_size}, '
                           f'above the {vocab_size} asked for; delete it or change the path')
    return tok
  return train(docs, vocab_size, model_type, prefix)


def fingerprint(docs: Sequence[str], vocab_size: int, model_type: str) -> str:
  """A short hash of what a trained tokenizer depends on, for cache file names."""
  h = hashlib.sha256(f'{vocab_size}:{model_type}:{len(docs)}:'.encode())
  for doc in docs:
    h.update(hashlib.sha256(doc.encode('utf-8', 'surrogatepass')).digest())
  return h.hexdigest()[:16]


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog='python -m data.tokenizer', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  t = sub.add_parser('train', help='train a SentencePiece model on text files')
  t.add_argument('--input', required=True, help='a text file or a glob of them')
  t.add_argument('--vocab-size', type=int, required=True)
  t.add_argument('--model-type', choices=MODEL_TYPES, default='unigram')
  t.add_argument('--out', required=True, help='output prefix: writes PREFIX.model, PREFIX.vocab')
  args = parser.parse_args(argv)
  try:  # One document per file.
    docs = [doc for _, doc in readers.iter_text(args.input, 'file', readers.BadInput('raise'))]
    tok = train(docs, args.vocab_size, args.model_type, args.out)
  except (TokenizerError, FileNotFoundError, readers.BadInputError) as e:
    parser.exit(2, f'error: {e}\n')
  print(f'wrote {tok.path} ({args.model_type}, vocab size {tok.vocab_size})')


if __name__ == '__main__':
  main()
