"""Sources: each selected `config.data.sources` entry as a random-access sequence of items.

Items by format: 'text' a document string (or a `Bad` record); 'sft' (where, messages), messages
= [{'role', 'content'}, ...]; 'preference' (where, chosen messages, rejected messages). Text is
tokenised lazily in the pipeline; SFT and preference items are read, checked and deduplicated up
front. `Source.stats`: counts known when built (bad input, local corpus hygiene, records).
"""

import dataclasses
import functools
import os
from typing import Any, Sequence

import ml_collections
import numpy as np

from data import chat, corpus, readers
from data import config as data_config
from data import hygiene as hygiene_lib


@dataclasses.dataclass(frozen=True)
class Bad:
  """A record that could not be read; counted (or raised) when the pipeline meets it."""
  where: str
  reason: str
  message: str


@dataclasses.dataclass
class Source:
  name: str
  format: str
  weight: float
  items: Sequence[Any]
  stats: dict[str, Any]
  lazy_hygiene: bool  # Text filters still to apply per document in the pipeline.


class _Lazy:
  """`size` items made on demand: item i is `get(i)`."""

  def __init__(self, size: int, get):
    self.size, self.get = size, get

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int):
    if not 0 <= index < self.size:
      raise IndexError(index)
    return self.get(int(index))


def _text_records(source, field: str, label: str) -> _Lazy:
  """The text field of each record of a tfds data source, decoded from UTF-8."""

  def record(index: int) -> str | Bad:
    value = source[index][field]
    if isinstance(value, str):
      return value
    try:
      return bytes(value).decode('utf-8')
    except UnicodeDecodeError as e:
      return Bad(f'{label} record {index}', 'invalid_utf8', f'invalid UTF-8 at byte {e.start}')
  return _Lazy(len(source), record)


def _spans(records: _Lazy, unit: str) -> _Lazy:
  """Records cut into paragraphs or lines: item i is a (record, start, end) slice of one."""
  spans, sep = [], '\n\n' if unit == 'paragraph' else '\n'
  for i, text in enumerate(records):  # _Lazy iterates by index until IndexError.
    if isinstance(text, Bad):
      spans.append((i, -1, -1))
      continue
    start = 0
    for piece in text.split(sep):
      if piece.strip():
        spans.append((i, start, start + len(piece)))
      start += len(piece) + len(sep)
  spans = np.asarray(spans, np.int64).reshape(-1, 3)
  text_of = functools.lru_cache(maxsize=1)(records.__getitem__)  # Neighbour spans share it.

  def span(index: int) -> str | Bad:
    record, start, end = (int(v) for v in spans[index])
    return text_of(record) if start < 0 else text_of(record)[start:end]
  return _Lazy(spans.shape[0], span)


def _held_out(items: list, fraction: float, split: str) -> list:
  """Every k-th item (k = 1/fraction) is 'eval', the rest 'train'."""
  every = max(1, round(1 / fraction)) if fraction > 0 else 0
  return [x for n, x in enumerate(items) if (every and n % every == every - 1) == (split == 'eval')]


def _jsonl_items(entry, data_cfg, split: str) -> tuple[list, dict]:
  bad = readers.BadInput(data_cfg.on_bad_input, max_chars=data_cfg.max_doc_chars)
  seen = hygiene_lib.Hygiene(data_cfg.hygiene, min_chars=0, max_chars=0, min_alpha_ratio=0.0,
                             max_repeated_line_ratio=1.0)  # Normalisation and dedup only.
  items, records = [], 0
  for where, obj in readers.iter_jsonl(entry.path, bad):
    records += 1
    if entry.format == 'sft':
      found = [(where, m) for m in chat.sft_messages(obj, entry.sft_format, where, bad)]
    else:
      pair = chat.preference_messages(obj, where, bad)
      found = [(where, *pair)] if pair else []
    for item in found:
      if data_cfg.hygiene.dedup and seen.check(repr(item[1:])) is None:
        continue
      items.append(item)
  stats = {'records': records, 'bad_input': dict(bad.counts),
           'duplicates': seen.counts.get('duplicate', 0)}
  return _held_out(items, float(entry.eval_fraction), split), stats


def _embedded_examples(entry, data_cfg, split: str) -> list:
  seed, n = int(data_cfg.embedded_seed), int(data_cfg.embedded_examples)
  total = n + int(data_cfg.embedded_eval_docs)
  rows = (corpus.instructions if entry.format == 'sft' else corpus.preferences)(seed, total)
  rows = rows[:n] if split == 'train' else rows[n:]
  out = []
  for i, row in enumerate(rows):
    user = {'role': 'user', 'content': row['prompt']}
    replies = [row['response']] if entry.format == 'sft' else [row['chosen'], row['rejected']]
    out.append((f'embedded {entry.format} example {i}',
                *([user, {'role': 'assistant', 'content': r}] for r in replies)))
  return out


def build(name: str, entry: ml_collections.ConfigDict, data_cfg, split: str,
          workdir: str) -> Source:
  """The items of `split` of one source entry."""
  if split not in data_config.SPLITS:
    raise data_config.DataConfigError(f'split {split!r} is not one of {data_config.SPLITS}')
  stats: dict[str, Any] = {}
  if entry.kind == 'embedded' and entry.format == 'text':
    n_train, n_eval = int(data_cfg.embedded_docs), int(data_cfg.embedded_eval_docs)
    start, size = (0, n_train) if split == 'train' else (n_train, n_eval)
    seed = int(data_cfg.embedded_seed)
    items = _Lazy(size, lambda i: corpus.document(seed, start + i))
  elif entry.kind == 'embedded':
    items = _embedded_examples(entry, data_cfg, split)
  elif entry.kind in ('tfds', 'local'):
    from data import builders  # pylint: disable=import-outside-toplevel  (tfds is slow to import)
    data_dir = data_cfg.tfds_data_dir or os.path.join(workdir, 'tfds')
    if entry.kind == 'tfds':
      tfds_split = entry.split if split == 'train' else entry.eval_split
      src = builders.tfds_source(entry.name, tfds_split, data_dir, entry.manual_dir)
      records = _text_records(src, entry.text_field, f'tfds {entry.name}[{tfds_split}]')
      items = _spans(records, entry.doc_unit) if entry.doc_unit else records
      stats['records'] = len(records)
    else:
      builder = builders.prepare_local(builders.local_spec(entry, data_cfg), data_dir)
      stats.update(builder.info.metadata or {})
      if split not in builder.info.splits:
        raise data_config.DataConfigError(
            f'config.data.sources.{name}: the prepared corpus has no {split!r} split (too few '
            f'documents, or eval_fraction is 0; counts when prepared: {stats})')
      items = _text_records(builder.as_data_source(split), 'text', f'local {name}[{split}]')
  else:
    items, stats = _jsonl_items(entry, data_cfg, split)
  if len(items) == 0:  # pylint: disable=g-explicit-length-test
    raise data_config.DataConfigError(f'config.data.sources.{name}: split {split!r} is empty '
                                      f'(counts when read: {stats})')
  stats['items'] = len(items)
  lazy = entry.kind in ('embedded', 'tfds') and entry.format == 'text'
  return Source(name, entry.format, float(entry.get('weight', 1.0)), items, stats, lazy)


def build_all(data_cfg, split: str, workdir: str) -> list[Source]:
  return [build(name, entry, data_cfg, split, workdir)
          for name, entry in data_config.selected(data_cfg)]


def sample_texts(sources: list[Source], n: int) -> list[str]:
  """About `n` texts drawn from the sources by weight, for training a tokenizer."""
  total = sum(s.weight for s in sources)
  out = []
  for s in sources:
    k = min(len(s.items), max(1, round(n * s.weight / total)))
    for item in (s.items[i] for i in range(k)):
      if isinstance(item, str):
        out.append(item)
      elif not isinstance(item, Bad):  # (where, messages, ...)
        out.extend(m['content'] for messages in item[1:] for m in messages)
  return out
