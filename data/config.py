"""Defaults of the `config.data` section, and their checks.

Top-level keys (read by data.pipeline):
  source            comma-separated names of entries of `sources`; several are mixed by their
                    `weight`s. Default 'embedded'.
  seq_len           T, tokens per packed row.
  packing           'concat' (fill rows, cut examples at row ends) or 'pad' (keep examples
                    whole; use it for SFT). See data.packing.
  tokenizer         path to a SentencePiece .model; '' trains one on a sample of the selected
                    sources, cached under `workdir/tokenizer/`.
  tokenizer_type    'unigram' or 'bpe' (only used when training).
  tokenizer_docs    how many documents the tokenizer is trained on.
  shuffle_seed      seed of the document order (reshuffled every epoch).
  tfds_data_dir     where tfds datasets and prepared local corpora live ('' = workdir/tfds).
  on_bad_input      'raise' (error naming file:line) or 'skip' (drop, count, log).
  max_doc_chars     the longest document read from a file (0: no bound); a longer one is
                    split, truncated or skipped as `long_docs` says ('split', 'truncate',
                    'skip'), and counted (see data.readers).
  hygiene           normalisation, dedup and quality filters (see data.hygiene).
  embedded_seed, embedded_docs, embedded_eval_docs
                    the generated corpus (data.corpus): seed, training and held-out sizes.
  embedded_examples number of generated SFT / preference examples in the training split.

Entries of `sources` (a ConfigDict each; `kind`, `format` and `weight` always):
  kind='embedded'   the generated corpus; format 'text', 'sft' or 'preference'.
  kind='tfds'       a catalogued dataset read with tfds.data_source: `name`, `split`,
                    `eval_split`, `text_field`, `doc_unit` ('' whole records, 'paragraph' or
                    'line': split records, e.g. tiny_shakespeare's single record),
                    `manual_dir` (pre-filled files for offline preparation).
  kind='local'      text or JSON-lines files prepared to array_record (data.builders):
                    `path` (file or glob), `file_format` ('text'|'jsonl'), `unit`
                    ('file'|'paragraph'|'line'), `text_field`, `eval_fraction`, `name`.
  kind='jsonl'      SFT (format 'sft', `sft_format` see data.chat) or preference (format
                    'preference') records read into memory: `path`, `eval_fraction`.
"""

import ml_collections

from data import hygiene, readers

KINDS = ('embedded', 'tfds', 'local', 'jsonl')
FORMATS = ('text', 'sft', 'preference')
SPLITS = ('train', 'eval')
_ENTRY_DEFAULTS = {  # Keys of a `sources` entry beyond kind, format and weight, by kind.
    'embedded': {},
    'tfds': {'name': '', 'split': 'train', 'eval_split': 'validation', 'text_field': 'text',
             'doc_unit': '', 'manual_dir': ''},
    'local': {'path': '', 'file_format': 'text', 'unit': 'paragraph', 'text_field': 'text',
              'eval_fraction': 0.01, 'name': ''},
    'jsonl': {'path': '', 'sft_format': 'auto', 'eval_fraction': 0.05},
}


class DataConfigError(ValueError):
  """A `config.data` value that cannot work; the message names the key."""


def source_entry(kind: str, format: str = 'text', weight: float = 1.0,  # pylint: disable=redefined-builtin
                 **kwargs) -> ml_collections.ConfigDict:
  """A `sources` entry, e.g. source_entry('tfds', name='tiny_shakespeare', doc_unit='paragraph')."""
  return ml_collections.ConfigDict({'kind': kind, 'format': format, 'weight': weight,
                                    **_ENTRY_DEFAULTS.get(kind, {}), **kwargs})


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.source = 'embedded'
  c.sources = ml_collections.ConfigDict({
      'embedded': source_entry('embedded'),
      'embedded_sft': source_entry('embedded', 'sft'),
      'embedded_preference': source_entry('embedded', 'preference'),
  })
  c.seq_len = 256
  c.packing = 'concat'
  c.tokenizer = ''
  c.tokenizer_type = 'unigram'
  c.tokenizer_docs = 4_000
  c.shuffle_seed = 0
  c.tfds_data_dir = ''
  c.on_bad_input = 'raise'
  c.max_doc_chars = 1_000_000
  c.long_docs = 'split'
  c.hygiene = hygiene.default_config()
  c.embedded_seed = 0
  c.embedded_docs = 50_000
  c.embedded_eval_docs = 1_000
  c.embedded_examples = 5_000
  return c


def selected(cfg) -> list[tuple[str, ml_collections.ConfigDict]]:
  """(name, entry) of every source named in `cfg.source`, checked."""
  names = [n.strip() for n in str(cfg.source).split(',') if n.strip()]
  if not names:
    raise DataConfigError('config.data.source: names no source')
  out = []
  for name in names:
    if name not in cfg.sources:
      raise DataConfigError(f'config.data.source: {name!r} is not an entry of '
                            f'config.data.sources ({", ".join(cfg.sources.keys())})')
    entry = cfg.sources[name]
    key = f'config.data.sources.{name}'
    if entry.get('kind') not in KINDS:
      raise DataConfigError(f'{key}.kind: {entry.get("kind")!r} is not one of {KINDS}')
    if entry.get('format') not in FORMATS:
      raise DataConfigError(f'{key}.format: {entry.get("format")!r} is not one of {FORMATS}')
    unknown = set(entry.keys()) - {'kind', 'format', 'weight'} - set(_ENTRY_DEFAULTS[entry.kind])
    if unknown:
      raise DataConfigError(f'{key}: unknown key(s) {sorted(unknown)} for kind {entry.kind!r}')
    if not float(entry.get('weight', 1.0)) > 0:
      raise DataConfigError(f'{key}.weight: must be positive, got {entry.get("weight")}')
    if entry.kind in ('local', 'jsonl') and '://' not in entry.get('path', ''):  # URLs: when read.
      try:
        readers.expand(entry.get('path') or '', 'a file or glob')
      except FileNotFoundError as e:
        raise DataConfigError(f'{key}.path: {e}') from e
    if entry.kind == 'tfds' and not entry.get('name'):
      raise DataConfigError(f'{key}.name: a tfds dataset name is needed')
    if entry.kind == 'jsonl' and entry.format == 'text':
      raise DataConfigError(f'{key}.format: jsonl sources hold sft or preference records; '
                            f"use kind='local' with file_format='jsonl' for text")
    if entry.kind in ('tfds', 'local') and entry.format != 'text':
      raise DataConfigError(f'{key}.format: {entry.kind} sources hold text')
    out.append((name, entry))
  return out


def validate(cfg, *, vocab_size: int, global_batch: int, process_count: int) -> None:
  """Raises DataConfigError naming the first bad key."""
  from data import packing, tokenizer  # pylint: disable=import-outside-toplevel

  def check(ok, key, msg):
    if not ok:
      raise DataConfigError(f'config.data.{key}: {msg}')

  selected(cfg)
  check(int(cfg.seq_len) >= 1, 'seq_len', f'must be positive, got {cfg.seq_len}')
  check(cfg.packing in packing.POLICIES, 'packing',
        f'{cfg.packing!r} is not one of {packing.POLICIES}')
  check(cfg.tokenizer_type in tokenizer.MODEL_TYPES, 'tokenizer_type',
        f'{cfg.tokenizer_type!r} is not one of {tokenizer.MODEL_TYPES}')
  check(cfg.on_bad_input in readers.ON_BAD_INPUT, 'on_bad_input',
        f'{cfg.on_bad_input!r} is not one of {readers.ON_BAD_INPUT}')
  check(cfg.long_docs in readers.LONG_DOCS, 'long_docs',
        f'{cfg.long_docs!r} is not one of {readers.LONG_DOCS}')
  check(int(cfg.max_doc_chars) >= 0, 'max_doc_chars', f'must be >= 0, got {cfg.max_doc_chars}')
  check(cfg.hygiene.normalize in hygiene.NORMALIZATIONS, 'hygiene.normalize',
        f'{cfg.hygiene.normalize!r} is not one of {hygiene.NORMALIZATIONS}')
  for key in ('tokenizer_docs', 'embedded_docs', 'embedded_eval_docs', 'embedded_examples'):
    check(int(cfg[key]) >= 1, key, f'must be positive, got {cfg[key]}')
  if global_batch < 1 or process_count < 1 or global_batch % process_count:
    raise DataConfigError(f'global batch {global_batch} must be a positive multiple of the '
                          f'process count {process_count}')
  if vocab_size < 1:
    raise DataConfigError(f'vocab_size must be positive, got {vocab_size}')
