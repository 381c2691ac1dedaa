"""Grain pipeline from documents to packed, process-local batches that resume exactly.

Batch contract (numpy, b = global_batch // process_count rows, T = config.data.seq_len):
  inputs int32[b,T], targets int32[b,T], positions int32[b,T], segment_ids int32[b,T],
  loss_mask float32[b,T]   (see data.packing for their meaning).

How rows are made, so that the global batch does not depend on the number of processes:
the document order is one shuffled, endlessly repeated sequence (a new order each epoch).
Row r of every global batch (0 <= r < global_batch) is packed from its own stream, the
documents at positions r, r + B, r + 2B, ... of that sequence. Process p builds only its rows
p*b .. (p+1)*b - 1, so it reads and tokenises only its share, and the rows of all processes
stacked in order are exactly the batch one process would build alone.

Each row stream is a grain pipeline (source -> shuffle -> repeat -> slice -> tokenise) feeding
a packing iterator; the streams are zipped into one grain iterator whose state is small and
JSON-serialisable: per stream, the index of the next document and how far into a cut
document the packer had got.

The 'eval' split is held out (its own draws of the generators, the documents after the
training ones; a few short templated texts such as a times table can still occur in both, as
they repeat within each split), is not shuffled, and starts
from the same place every time an iterator is made: take the first N batches for an eval.
"""

import json
import os
from typing import Any

import grain
import ml_collections
import numpy as np

from data import config as data_config
from data import corpus, packing
from data import tokenizer as tokenizer_lib

STATE_VERSION = 1
# Row streams read synchronously: one thread pool per row would cost more than it saves.
_SYNC_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


class _EmbeddedDocs:
  """Documents `start .. start + size - 1` of the generated corpus, made on demand."""

  def __init__(self, seed: int, start: int, size: int):
    self.seed, self.start, self.size = seed, start, size

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> str:
    if not 0 <= index < self.size:
      raise IndexError(index)
    return corpus.document(self.seed, self.start + int(index))


def documents_source(data_cfg, split: str):
  """A random-access sequence of the documents (strings) of `split`."""
  if split not in data_config.SPLITS:
    raise data_config.DataConfigError(f'split {split!r} is not one of {data_config.SPLITS}')
  n_train, n_eval = int(data_cfg.embedded_docs), int(data_cfg.embedded_eval_docs)
  if split == 'train':
    return _EmbeddedDocs(int(data_cfg.embedded_seed), 0, n_train)
  return _EmbeddedDocs(int(data_cfg.embedded_seed), n_train, n_eval)


def load_tokenizer(data_cfg, *, vocab_size: int, workdir: str) -> tokenizer_lib.Tokenizer:
  """The configured tokenizer, or one trained on the training documents and cached."""
  if data_cfg.tokenizer:
    tok = tokenizer_lib.Tokenizer(data_cfg.tokenizer)
  else:
    docs = documents_source(data_cfg, 'train')
    sample = [docs[i] for i in range(min(len(docs), int(data_cfg.tokenizer_docs)))]
    fp = tokenizer_lib.fingerprint(sample, vocab_size, data_cfg.tokenizer_type)
    path = os.path.join(workdir, 'tokenizer', f'{data_cfg.tokenizer_type}_{vocab_size}_{fp}')
    tok = tokenizer_lib.train_or_load(sample, vocab_size, data_cfg.tokenizer_type, path)
  if tok.vocab_size > vocab_size:
    raise data_config.DataConfigError(
        f'config.data.tokenizer: {tok.path} has {tok.vocab_size} pieces, more than the model '
        f'vocab_size {vocab_size}')
  return tok


class PackIterDataset(grain.IterDataset):
  """Packs a stream of examples (see data.packing.lm_example) into rows of length T."""

  def __init__(self, parent: grain.IterDataset, seq_len: int, policy: str, pad_id: int):
    super().__init__(parent)
    self._seq_len, self._policy, self._pad_id = seq_len, policy, pad_id

  def __iter__(self) -> '_PackIterator':
    return _PackIterator(self._parent.__iter__(), self._seq_len, self._policy, self._pad_id)


class _PackIterator(grain.DatasetIterator):
  """State: the parent's state before the example being cut, and the cut's offset."""

  def __init__(self, parent, seq_len, policy, pad_id):
    super().__init__(parent)
    self._packer = packing.RowPacker(seq_len, policy, pad_id)
    self._pending_state = None  # Parent state from which `packer.pending` was read.

  def _next_example(self):
    self._pending_state = self._parent.get_state()
    return next(self._parent)

  def __next__(self) -> dict[str, np.ndarray]:
    return self._packer.pack(self._next_example)

  def get_state(self) -> dict[str, Any]:
    if self._packer.pending is None:
      return {'parent': self._parent.get_state(), 'offset': -1}
    return {'parent': self._pending_state, 'offset': self._packer.offset}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._packer.reset()
    if state['offset'] >= 0:
      self._pending_state = state['parent']
      self._packer.reset(next(self._parent), int(state['offset']))


def _stack_rows(rows: tuple) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in packing.FEATURES}


class DataIterator:
  """Process-local packed batches: `next(it)`, `get_state()`, `set_state(s)`, `.tokenizer`."""

  def __init__(self, dataset: grain.IterDataset, tokenizer: tokenizer_lib.Tokenizer,
               signature: dict[str, Any]):
    self.tokenizer = tokenizer
    self._iterator = dataset.__iter__()
    self._signature = signature

  def __iter__(self) -> 'DataIterator':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict[str, Any]:
    """A JSON-serialisable state; `set_state` of it makes the next batch the one due now."""
    return {'version': STATE_VERSION, 'signature': dict(self._signature),
            'grain': self._iterator.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or state.get('version') != STATE_VERSION:
      raise ValueError(f'data iterator state of an unknown format: {str(state)[:200]}')
    if state['signature'] != self._signature:
      diff = {k: (state['signature'].get(k), v) for k, v in self._signature.items()
              if state['signature'].get(k) != v}
      raise ValueError(f'data iterator state was saved by a differently built pipeline '
                       f'(saved vs now: {diff})')
    self._iterator.set_state(state['grain'])

  def state_json(self) -> str:
    return json.dumps(self.get_state())


def _effective_seed(shuffle_seed: int, seed: int) -> int:
  return int(np.random.SeedSequence([int(shuffle_seed), int(seed)]).generate_state(1)[0])


def make_iterator(data_cfg: ml_collections.ConfigDict, *, vocab_size: int, global_batch: int,
                  workdir: str, split: str = 'train', process_index: int = 0,
                  process_count: int = 1, seed: int = 0) -> DataIterator:
  """Packed batches of `split`: this process's rows of each global batch (see module doc)."""
  data_config.validate(data_cfg, vocab_size=vocab_size, global_batch=global_batch,
                       process_count=process_count)
  if not 0 <= process_index < process_count:
    raise data_config.DataConfigError(
        f'process_index {process_index} is outside [0, {process_count})')
  tok = load_tokenizer(data_cfg, vocab_size=vocab_size, workdir=workdir)
  bos, eos = tok.bos_id, tok.eos_id

  def encode(doc: str) -> dict[str, np.ndarray]:
    return packing.lm_example(np.asarray([bos] + tok.encode(doc) + [eos], np.int32))

  docs = grain.MapDataset.source(documents_source(data_cfg, split))
  shuffle_seed = _effective_seed(data_cfg.shuffle_seed, seed)
  if split == 'train':
    docs = docs.seed(shuffle_seed).shuffle()
  docs = docs.repeat(None)
  local = global_batch // process_count
  rows = range(process_index * local, (process_index + 1) * local)
  streams = [PackIterDataset(docs[r::global_batch].map(encode).to_iter_dataset(_SYNC_READ),
                             int(data_cfg.seq_len), data_cfg.packing, tok.pad_id)
             for r in rows]
  dataset = grain.experimental.ZipIterDataset(streams).map(_stack_rows)
  signature = {'split': split, 'global_batch': global_batch, 'process_index': process_index,
               'process_count': process_count, 'seq_len': int(data_cfg.seq_len),
               'packing': data_cfg.packing, 'source': data_cfg.source,
               'shuffle_seed': shuffle_seed, 'tokenizer_vocab': tok.vocab_size}
  return DataIterator(dataset, tok, signature)
