"""Defaults of the `config.data` section (each key explained beside it), and their checks.

Entries of `sources` (a ConfigDict each; `kind`, `format` and `weight` always, the other keys
and their defaults in `_ENTRY_DEFAULTS`):
  kind='embedded'   the generated corpus (data.corpus); format 'text', 'sft' or 'preference'.
  kind='tfds'       a catalogued dataset read with tfds.data_source; `doc_unit` '' keeps whole
                    records, 'paragraph' or 'line' splits them (tiny_shakespeare's single
                    record); `manual_dir` holds pre-filled files for offline preparation.
  kind='local'      text or JSON-lines files (`path`: file or glob) prepared to array_record
                    (data.builders), cut into documents by `unit` ('file'|'paragraph'|'line').
  kind='jsonl'      SFT (`sft_format`, see data.chat) or preference records read into memory.
"""

import ml_collections

from data import hygiene, packing, readers, tokenizer

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
  c.source = 'embedded'  # Comma-separated names of `sources` entries, mixed by their weights.
  c.sources = ml_collections.ConfigDict({
      'embedded': source_entry('embedded'),
      'embedded_sft': source_entry('embedded', 'sft'),
      'embedded_preference': source_entry('embedded', 'preference'),
  })
  c.seq_len = 256  # T, tokens per packed row.
  c.packing = 'concat'  # Or 'pad': examples kept whole (SFT); see data.packing.
  c.tokenizer = ''  # A SentencePiece .model; '': trained on the sources, under workdir/tokenizer.
  c.tokenizer_type = 'unigram'  # Or 'bpe' (when training one).
  c.tokenizer_docs = 4_000  # Documents the tokenizer is trained on.
  c.shuffle_seed = 0  # Seed of the document order, reshuffled every epoch.
  c.tfds_data_dir = ''  # tfds datasets and prepared local corpora; '': workdir/tfds.
  c.on_bad_input = 'raise'  # Error naming file:line, or 'skip': drop, count, log.
  c.max_doc_chars = 1_000_000  # Longest document read (0: no bound); longer ones as long_docs
  c.long_docs = 'split'  # says: 'split', 'truncate' or 'skip', counted (data.readers).
  c.hygiene = hygiene.default_config()  # Normalisation, dedup, quality filters (data.hygiene).
  c.embedded_seed = 0  # The generated corpus: seed, training and held-out documents,
  c.embedded_docs = 50_000
  c.embedded_eval_docs = 1_000
  c.embedded_examples = 5_000  # and SFT / preference examples in the training split.
  return c


def _check(ok: bool, key: str, msg: str) -> None:
  if not ok:
    raise DataConfigError(f'config.data.{key}: {msg}')


def selected(cfg) -> list[tuple[str, ml_collections.ConfigDict]]:
  """(name, entry) of every source named in `cfg.source`, checked; keys an entry leaves out (one
  given whole on the command line) take source_entry's defaults."""
  names = [n.strip() for n in str(cfg.source).split(',') if n.strip()]
  _check(bool(names), 'source', 'names no source')
  out = []
  for name in names:
    _check(name in cfg.sources, 'source', f'{name!r} is not an entry of config.data.sources '
           f'({", ".join(cfg.sources.keys())})')
    entry, key = cfg.sources[name], f'sources.{name}'
    kind, fmt = entry.get('kind'), entry.get('format')
    _check(kind in KINDS, f'{key}.kind', f'{kind!r} is not one of {KINDS}')
    _check(fmt in FORMATS, f'{key}.format', f'{fmt!r} is not one of {FORMATS}')
    unknown = set(entry.keys()) - {'kind', 'format', 'weight'} - set(_ENTRY_DEFAULTS[kind])
    _check(not unknown, key, f'unknown key(s) {sorted(unknown)} for kind {kind!r}')
    _check(float(entry.get('weight', 1.0)) > 0, f'{key}.weight',
           f'must be positive, got {entry.get("weight")}')
    if kind in ('local', 'jsonl') and '://' not in entry.get('path', ''):  # URLs: when read.
      try:
        readers.expand(entry.get('path') or '', 'a file or glob')
      except FileNotFoundError as e:
        raise DataConfigError(f'config.data.{key}.path: {e}') from e
    _check(kind != 'tfds' or entry.get('name'), f'{key}.name', 'a tfds dataset name is needed')
    _check(kind != 'jsonl' or fmt != 'text', f'{key}.format', 'jsonl sources hold sft or '
           "preference records; use kind='local' with file_format='jsonl' for text")
    _check(kind not in ('tfds', 'local') or fmt == 'text', f'{key}.format',
           f'{kind} sources hold text')
    out.append((name, source_entry(**entry.to_dict())))
  return out


def validate(cfg, *, vocab_size: int, global_batch: int, process_count: int) -> None:
  """Raises DataConfigError naming the first bad key."""
  selected(cfg)
  for key in ('seq_len', 'tokenizer_docs', 'embedded_docs', 'embedded_eval_docs',
              'embedded_examples'):
    _check(int(cfg[key]) >= 1, key, f'must be positive, got {cfg[key]}')
  for key, value, choices in (
      ('packing', cfg.packing, packing.POLICIES),
      ('tokenizer_type', cfg.tokenizer_type, tokenizer.MODEL_TYPES),
      ('on_bad_input', cfg.on_bad_input, readers.ON_BAD_INPUT),
      ('long_docs', cfg.long_docs, readers.LONG_DOCS),
      ('hygiene.normalize', cfg.hygiene.normalize, hygiene.NORMALIZATIONS)):
    _check(value in choices, key, f'{value!r} is not one of {choices}')
  _check(int(cfg.max_doc_chars) >= 0, 'max_doc_chars', f'must be >= 0, got {cfg.max_doc_chars}')
  if global_batch < 1 or process_count < 1 or global_batch % process_count:
    raise DataConfigError(f'global batch {global_batch} must be a positive multiple of the '
                          f'process count {process_count}')
  if vocab_size < 1:
    raise DataConfigError(f'vocab_size must be positive, got {vocab_size}')
