"""Defaults of the `config.data` section, and their checks.

Keys (all read by `data.pipeline.make_iterator`):
  source            'embedded': the generated corpus of data.corpus (no files, no network).
  seq_len           T, tokens per packed row.
  packing           'concat' (fill rows, cut examples at row ends) or 'pad' (see data.packing).
  tokenizer         path to a SentencePiece .model; '' trains one on the corpus, cached under
                    `workdir/tokenizer/`.
  tokenizer_type    'unigram' or 'bpe' (only used when training).
  tokenizer_docs    how many training documents the tokenizer is trained on.
  shuffle_seed      seed of the document order (reshuffled every epoch).
  embedded_seed     seed of the generated corpus.
  embedded_docs     size of the generated training split, in documents (~230 bytes each).
  embedded_eval_docs  size of the held-out 'eval' split (documents after the training ones).
"""

import ml_collections

SOURCES = ('embedded',)
SPLITS = ('train', 'eval')


class DataConfigError(ValueError):
  """A `config.data` value that cannot work; the message names the key."""


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.source = 'embedded'
  c.seq_len = 256
  c.packing = 'concat'
  c.tokenizer = ''
  c.tokenizer_type = 'unigram'
  c.tokenizer_docs = 4_000
  c.shuffle_seed = 0
  c.embedded_seed = 0
  c.embedded_docs = 50_000
  c.embedded_eval_docs = 1_000
  return c


def validate(cfg, *, vocab_size: int, global_batch: int, process_count: int) -> None:
  """Raises DataConfigError naming the first bad key."""
  from data import packing, tokenizer  # pylint: disable=import-outside-toplevel

  def check(ok, key, msg):
    if not ok:
      raise DataConfigError(f'config.data.{key}: {msg}')

  check(cfg.source in SOURCES, 'source', f'{cfg.source!r} is not one of {SOURCES}')
  check(int(cfg.seq_len) >= 1, 'seq_len', f'must be positive, got {cfg.seq_len}')
  check(cfg.packing in packing.POLICIES, 'packing',
        f'{cfg.packing!r} is not one of {packing.POLICIES}')
  check(cfg.tokenizer_type in tokenizer.MODEL_TYPES, 'tokenizer_type',
        f'{cfg.tokenizer_type!r} is not one of {tokenizer.MODEL_TYPES}')
  check(int(cfg.tokenizer_docs) >= 1, 'tokenizer_docs', 'must be positive')
  check(int(cfg.embedded_docs) >= 1, 'embedded_docs', 'must be positive')
  check(int(cfg.embedded_eval_docs) >= 1, 'embedded_eval_docs', 'must be positive')
  if global_batch < 1 or process_count < 1 or global_batch % process_count:
    raise DataConfigError(f'global batch {global_batch} must be a positive multiple of the '
                          f'process count {process_count}')
  if vocab_size < 1:
    raise DataConfigError(f'vocab_size must be positive, got {vocab_size}')
