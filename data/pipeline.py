"""Grain pipelines from sources to process-local batches that resume exactly.

`make_iterator` batches (numpy, b = global_batch // process_count rows, T = seq_len): inputs,
targets, positions, segment_ids int32[b,T], loss_mask float32[b,T] (data.packing).
`make_preference_iterator`: {'chosen': batch, 'rejected': batch}, row i of both from one pair.

The global batch does not depend on the process count: all selected sources' items are mixed by
weight into one sequence, reshuffled every epoch and repeated without end; row r of every global
batch packs its own stream, items r, r + B, r + 2B, ..., and process p builds only the rows
p*b .. (p+1)*b - 1. The state is JSON: per row stream, the next item's index, the offset into a
cut document, per-source counts. 'eval' is not shuffled and restarts in every new iterator.
"""

import collections
import os
import sys
from typing import Any

import grain
import ml_collections
import numpy as np

from data import chat, packing, readers, sources
from data import config as data_config
from data import hygiene as hygiene_lib
from data import tokenizer as tokenizer_lib

STATE_VERSION = 2
# Row streams read synchronously: one thread pool per row would cost more than it saves.
_SYNC_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
_MIX_WINDOW = 4096


def load_tokenizer(data_cfg, *, vocab_size: int, workdir: str,
                   srcs: list[sources.Source] | None = None) -> tokenizer_lib.Tokenizer:
  """The configured tokenizer, or one trained on a sample of the training sources (cached)."""
  if data_cfg.tokenizer:
    tok = tokenizer_lib.Tokenizer(data_cfg.tokenizer)
  else:
    srcs = srcs or sources.build_all(data_cfg, 'train', workdir)
    sample = sources.sample_texts(srcs, int(data_cfg.tokenizer_docs))
    fp = tokenizer_lib.fingerprint(sample, vocab_size, data_cfg.tokenizer_type)
    path = os.path.join(workdir, 'tokenizer', f'{data_cfg.tokenizer_type}_{vocab_size}_{fp}')
    tok = tokenizer_lib.train_or_load(sample, vocab_size, data_cfg.tokenizer_type, path)
  if tok.vocab_size > vocab_size:
    raise data_config.DataConfigError(
        f'config.data.tokenizer: {tok.path} has {tok.vocab_size} pieces, more than the model '
        f'vocab_size {vocab_size}')
  return tok


class PackIterDataset(grain.IterDataset):
  """Packs a stream of examples (data.packing.lm_example + 'source') into rows of length T."""

  def __init__(self, parent: grain.IterDataset, seq_len: int, policy: str, pad_id: int,
               source_names: list[str]):
    super().__init__(parent)
    self._args = (seq_len, policy, pad_id, source_names)

  def __iter__(self) -> '_PackIterator':
    return _PackIterator(self._parent.__iter__(), *self._args)


class _PackIterator(grain.DatasetIterator):
  """State: the parent's state before the example being cut, the cut's offset, counts."""

  def __init__(self, parent, seq_len, policy, pad_id, source_names):
    super().__init__(parent)
    self._packer = packing.RowPacker(seq_len, policy, pad_id)
    self._names = source_names
    self._pending_state = None  # Parent state from which `packer.pending` was read.
    self._counts = {n: collections.Counter() for n in source_names}

  def _next_example(self):
    while True:
      self._pending_state = self._parent.get_state()
      example = next(self._parent)
      counts = self._counts[self._names[example['source']]]
      if 'skip' in example:
        counts['skipped_' + example['skip']] += 1
        continue
      counts['items'] += 1
      counts['tokens'] += int(example['inputs'].shape[0])
      return example

  def __next__(self) -> dict[str, np.ndarray]:
    return self._packer.pack(self._next_example)

  def get_state(self) -> dict[str, Any]:
    counts = {n: dict(c) for n, c in self._counts.items()}
    if self._packer.pending is None:
      return {'parent': self._parent.get_state(), 'offset': -1, 'counts': counts}
    return {'parent': self._pending_state, 'offset': self._packer.offset, 'counts': counts}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._packer.reset()
    self._counts = {n: collections.Counter(state['counts'].get(n, {})) for n in self._names}
    if state['offset'] >= 0:
      self._pending_state = state['parent']
      self._packer.reset(next(self._parent), int(state['offset']))


def _sum_counts(state: Any, into: dict) -> None:
  """Adds up the per-source counts found anywhere in a grain state tree."""
  if isinstance(state, dict):
    if 'counts' in state and 'offset' in state:
      for name, c in state['counts'].items():
        into.setdefault(name, collections.Counter()).update(c)
    state = list(state.values())
  for v in state if isinstance(state, list) else ():
    _sum_counts(v, into)


class DataIterator:
  """Process-local batches: `next(it)`, `get_state()`, `set_state(s)`, `.tokenizer`."""

  def __init__(self, dataset: grain.IterDataset, tokenizer: tokenizer_lib.Tokenizer,
               signature: dict[str, Any], srcs: list[sources.Source]):
    self.tokenizer = tokenizer
    self._iterator = dataset.__iter__()
    self._signature = signature
    self.build_stats = {s.name: s.stats for s in srcs}  # Per source: counts known when built.

  def __iter__(self) -> 'DataIterator':
    return self

  def __next__(self) -> dict[str, Any]:
    return next(self._iterator)

  def counts(self) -> dict[str, dict[str, int]]:
    """Per source: items and tokens read so far and items skipped by reason (this process)."""
    total: dict[str, collections.Counter] = {}
    _sum_counts(self._iterator.get_state(), total)
    return {n: dict(c) for n, c in total.items()}

  def get_state(self) -> dict[str, Any]:
    """A JSON-serialisable state; `set_state` of it makes the next batch the one due now."""
    return {'version': STATE_VERSION, 'signature': dict(self._signature),
            'grain': self._iterator.get_state(),
            'counts': {'read': self.counts(), 'built': self.build_stats}}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or state.get('version') != STATE_VERSION:
      raise ValueError(f'data iterator state of an unknown format: {str(state)[:200]}')
    if state['signature'] != self._signature:
      diff = {k: (state['signature'].get(k), v) for k, v in self._signature.items()
              if state['signature'].get(k) != v}
      raise ValueError(f'data iterator state was saved by a differently built pipeline '
                       f'(saved vs now: {diff})')
    self._iterator.set_state(state['grain'])


def _text_encoder(tok, data_cfg, source_index: int, lazy_hygiene: bool):
  bos, eos = tok.bos_id, tok.eos_id
  clean = hygiene_lib.Hygiene(data_cfg.hygiene, dedup=False) if lazy_hygiene else None
  bad = readers.BadInput(data_cfg.on_bad_input)

  def encode(item):
    if isinstance(item, sources.Bad):
      bad(item.where, item.reason, item.message)  # Raises unless skipping.
      return {'skip': item.reason, 'source': source_index}
    if clean is not None:
      item, reason = clean.filter(item)
      if reason:
        return {'skip': reason, 'source': source_index}
    ids = np.asarray([bos] + tok.encode(item) + [eos], np.int32)
    return {**packing.lm_example(ids), 'source': source_index}
  return encode


def _tokenize_chat(src: sources.Source, tok: tokenizer_lib.Tokenizer, data_cfg) -> list:
  """SFT items -> [(ids, weights)]; preference items -> [((ids, w), (ids, w))]; those longer
  than seq_len are bad input, counted in `src.stats`; an error with the counts if none is left."""
  template, seq_len = chat.ChatTemplate(tok), int(data_cfg.seq_len)
  bad = readers.BadInput(data_cfg.on_bad_input)
  out = []
  for item in src.items:
    where, conversations = item[0], item[1:]
    encoded = [template.sft_example(m, where) for m in conversations]
    longest = max(ids.shape[0] for ids, _ in encoded) - 1
    if longest > seq_len:
      bad(where, 'too_long', f'example of {longest} tokens is longer than seq_len {seq_len}')
      continue
    out.append(encoded[0] if len(encoded) == 1 else tuple(encoded))
  src.stats.update(too_long=bad.counts.get('too_long', 0), items=len(out))
  if not out:
    raise data_config.DataConfigError(f'config.data.sources.{src.name}: no example fits seq_len '
                                      f'{seq_len} (counts: {src.stats})')
  return out


def _prepare(data_cfg, vocab_size, global_batch, workdir, split, process_index, process_count,
             seed, formats, to_dataset):
  """(mixed items of all sources, tokenizer, signature, the sources);
  `to_dataset(index, source, tokenizer)` gives a source's items as a grain MapDataset."""
  data_config.validate(data_cfg, vocab_size=vocab_size, global_batch=global_batch,
                       process_count=process_count)
  if not 0 <= process_index < process_count:
    raise data_config.DataConfigError(
        f'process_index {process_index} is outside [0, {process_count})')
  srcs = sources.build_all(data_cfg, split, workdir)
  for s in srcs:
    if s.format not in formats:
      raise data_config.DataConfigError(
          f'config.data.sources.{s.name}.format: {s.format!r} sources do not go in this '
          f'iterator (it takes {formats})')
  tok = load_tokenizer(data_cfg, vocab_size=vocab_size, workdir=workdir,
                       srcs=srcs if split == 'train' else None)
  seeds = np.random.SeedSequence([int(data_cfg.shuffle_seed), int(seed)])
  signature = {'split': split, 'global_batch': global_batch, 'process_index': process_index,
               'process_count': process_count, 'seq_len': int(data_cfg.seq_len),
               'packing': data_cfg.packing, 'source': str(data_cfg.source),
               'shuffle_seed': int(seeds.generate_state(1)[0]), 'tokenizer_vocab': tok.vocab_size}
  datasets = [to_dataset(i, s, tok) for i, s in enumerate(srcs)]
  shuffle = signature['shuffle_seed'] if split == 'train' else None
  mixed = _mix(datasets, [s.weight for s in srcs], shuffle)
  return mixed, tok, signature, srcs


def _mix(datasets: list, weights: list, shuffle_seed: int | None):
  """Shuffled (when a seed is given), endlessly repeated mix of random-access datasets; shuffled
  again within windows, as row r's every B-th item would alias with grain's fixed mix pattern."""
  if shuffle_seed is not None:
    datasets = [d.seed(shuffle_seed + i).shuffle() for i, d in enumerate(datasets)]
  datasets = [d.repeat(None) for d in datasets]
  if len(datasets) == 1:
    return datasets[0]
  mixed = grain.MapDataset.mix(datasets, weights)
  return grain.experimental.WindowShuffleMapDataset(
      mixed, window_size=_MIX_WINDOW, seed=(shuffle_seed or 0) + len(datasets))


def make_iterator(data_cfg: ml_collections.ConfigDict, *, vocab_size: int, global_batch: int,
                  workdir: str, split: str = 'train', process_index: int = 0,
                  process_count: int = 1, seed: int = 0) -> DataIterator:
  """Packed batches of text and SFT sources: this process's rows of each global batch."""

  def to_dataset(i, s, tok):
    if s.format == 'text':
      return grain.MapDataset.source(s.items).map(_text_encoder(tok, data_cfg, i, s.lazy_hygiene))
    return grain.MapDataset.source([{**packing.lm_example(*e), 'source': i}
                                    for e in _tokenize_chat(s, tok, data_cfg)])

  mixed, tok, signature, srcs = _prepare(
      data_cfg, vocab_size, global_batch, workdir, split, process_index, process_count, seed,
      ('text', 'sft'), to_dataset)
  local = global_batch // process_count
  streams = [PackIterDataset(mixed[r::global_batch].to_iter_dataset(_SYNC_READ),
                             int(data_cfg.seq_len), data_cfg.packing, tok.pad_id,
                             [s.name for s in srcs])
             for r in range(process_index * local, (process_index + 1) * local)]
  dataset = grain.experimental.ZipIterDataset(streams).map(packing.stack_rows)
  return DataIterator(dataset, tok, signature, srcs)


def _pair_rows(pairs: list, seq_len: int, pad_id: int) -> dict[str, dict[str, np.ndarray]]:
  out = {}
  for side, k in (('chosen', 0), ('rejected', 1)):
    rows = [packing.pack_examples([packing.lm_example(*p[k])], seq_len, 'pad', pad_id)
            for p in pairs]
    out[side] = {f: np.concatenate([r[f] for r in rows]) for f in packing.FEATURES}
  return out


def make_preference_iterator(data_cfg: ml_collections.ConfigDict, *, vocab_size: int,
                             global_batch: int, workdir: str, split: str = 'train',
                             process_index: int = 0, process_count: int = 1,
                             seed: int = 0) -> DataIterator:
  """Batches {'chosen': rows, 'rejected': rows} of preference sources, one pair per row."""
  mixed, tok, signature, srcs = _prepare(
      data_cfg, vocab_size, global_batch, workdir, split, process_index, process_count, seed,
      ('preference',),
      lambda i, s, tok: grain.MapDataset.source(_tokenize_chat(s, tok, data_cfg)))
  local = global_batch // process_count
  first = process_index * local

  def batch(k):
    start = int(k) * global_batch + first
    return _pair_rows([mixed[start + j] for j in range(local)], int(data_cfg.seq_len), tok.pad_id)

  dataset = grain.MapDataset.range(sys.maxsize // global_batch).map(batch)
  return DataIterator(dataset.to_iter_dataset(_SYNC_READ), tok, signature, srcs)
