"""Packing tokenised examples into fixed-length rows, with segments, positions and masks.

An example is one document already shifted for next-token prediction: a document of ids
`[BOS] + tokens + [EOS]` gives `inputs = ids[:-1]`, `targets = ids[1:]` and per-target
`weights` (all ones for pretraining text; the assistant mask for SFT). Because the shift
happens per document, no target ever comes from another document.

A row of length T holds pieces of examples back to back:
  segment_ids  1, 2, 3, ... for the pieces in the row, 0 on padding;
  positions    restarting at 0 at the start of every piece;
  loss_mask    the example's weights on real tokens, 0.0 on padding;
  inputs/targets  the tokens, `pad_id` on padding.

Pieces: an example longer than what is left of the row is cut. Each cut-off piece is a
segment of its own and its positions restart at 0 (the model cannot attend to the earlier
piece in another row anyway, so it sees each piece as a sequence starting fresh; the first
piece keeps the BOS, later ones start mid-text). Two policies decide where cuts happen:
  'concat'  fill every row to the end; an example that does not fit continues in the next
            row. No padding except at the very end. The pretraining default.
  'pad'     an example that does not fit in what is left of a non-empty row moves whole to
            the next row and the rest of this row is padding; only examples longer than T
            are cut (into T-long pieces). For SFT, where prompt and answer should stay together.

All per-token work is numpy on whole pieces; Python runs once per piece, not per token.
"""

from typing import Callable, Iterator, Mapping

import numpy as np

POLICIES = ('concat', 'pad')
FEATURES = ('inputs', 'targets', 'positions', 'segment_ids', 'loss_mask')


def lm_example(ids: np.ndarray | list[int], weights: np.ndarray | None = None) -> dict:
  """The shifted example of one document `ids` (BOS/EOS already in place).

  `weights`, if given, has one entry per token of `ids` and says whether a token is learned:
  the example's weight for target `ids[i]` is `weights[i]` (i >= 1).
  """
  ids = np.asarray(ids, np.int32)
  if ids.ndim != 1 or ids.shape[0] < 2:
    raise ValueError(f'a document needs at least 2 ids (BOS and EOS), got shape {ids.shape}')
  if weights is None:
    w = np.ones(ids.shape[0] - 1, np.float32)
  else:
    weights = np.asarray(weights, np.float32)
    if weights.shape != ids.shape:
      raise ValueError(f'weights shape {weights.shape} differs from ids shape {ids.shape}')
    w = weights[1:]
  return {'inputs': ids[:-1], 'targets': ids[1:], 'weights': w}


class RowPacker:
  """Builds rows from a stream of examples; remembers the example it is in the middle of.

  `pending` is the example being consumed and `offset` how much of it went into earlier
  rows; a checkpoint needs only the source position of `pending` and `offset`.
  """

  def __init__(self, seq_len: int, policy: str = 'concat', pad_id: int = 0):
    if seq_len < 1:
      raise ValueError(f'seq_len must be positive, got {seq_len}')
    if policy not in POLICIES:
      raise ValueError(f'packing policy {policy!r} is not one of {POLICIES}')
    self.seq_len = seq_len
    self.policy = policy
    self.pad_id = pad_id
    self.pending: Mapping[str, np.ndarray] | None = None
    self.offset = 0

  def reset(self, pending: Mapping[str, np.ndarray] | None = None, offset: int = 0) -> None:
    self.pending, self.offset = pending, offset

  def pack(self, next_example: Callable[[], Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One row of length T; `next_example()` is called whenever a new example is needed.

    When `next_example` raises StopIteration, the row is finished with padding; a row with
    nothing in it re-raises it.
    """
    t = self.seq_len
    inputs, targets, weights, lengths = [], [], [], []
    filled = 0
    while filled < t:
      if self.pending is None:
        try:
          example = next_example()
        except StopIteration:
          if not lengths:
            raise
          break
        n = example['inputs'].shape[0]
        if n == 0:
          continue
        if self.policy == 'pad' and filled and n > t - filled:
          self.pending, self.offset = example, 0
          break
        self.pending, self.offset = example, 0
      ex, start = self.pending, self.offset
      n = ex['inputs'].shape[0]
      take = min(n - start, t - filled)
      inputs.append(ex['inputs'][start:start + take])
      targets.append(ex['targets'][start:start + take])
      weights.append(ex['weights'][start:start + take])
      lengths.append(take)
      filled += take
      if start + take == n:
        self.pending, self.offset = None, 0
      else:
        self.offset = start + take
    return _assemble(inputs, targets, weights, lengths, t, self.pad_id)


def _assemble(inputs, targets, weights, lengths, t, pad_id) -> dict[str, np.ndarray]:
  lengths = np.asarray(lengths, np.int32)
  filled = int(lengths.sum())
  pad = t - filled
  starts = np.cumsum(lengths) - lengths
  row = {
      'inputs': np.concatenate(inputs + [np.full(pad, pad_id, np.int32)]).astype(np.int32),
      'targets': np.concatenate(targets + [np.full(pad, pad_id, np.int32)]).astype(np.int32),
      'loss_mask': np.concatenate(weights + [np.zeros(pad, np.float32)]).astype(np.float32),
  }
  segment_ids = np.zeros(t, np.int32)
  segment_ids[:filled] = np.repeat(np.arange(1, len(lengths) + 1, dtype=np.int32), lengths)
  positions = np.zeros(t, np.int32)
  positions[:filled] = np.arange(filled, dtype=np.int32) - np.repeat(starts, lengths)
  row['segment_ids'] = segment_ids
  row['positions'] = positions
  return row


def pack_examples(examples: Iterator[Mapping[str, np.ndarray]] | list, seq_len: int,
                  policy: str = 'concat', pad_id: int = 0) -> dict[str, np.ndarray]:
  """Packs a finite list of examples into as many rows as they need: dict of [N, T] arrays."""
  packer = RowPacker(seq_len, policy, pad_id)
  it = iter(examples)
  rows = []
  while True:
    try:
      rows.append(packer.pack(lambda: next(it)))
    except StopIteration:
      break
  if not rows:
    return {k: np.zeros((0, seq_len), np.float32 if k == 'loss_mask' else np.int32)
            for k in FEATURES}
  return {k: np.stack([r[k] for r in rows]) for k in FEATURES}


def pack_documents(docs_ids: list, seq_len: int, *, bos_id: int, eos_id: int,
                   policy: str = 'concat', pad_id: int = 0) -> dict[str, np.ndarray]:
  """Packs tokenised documents (lists of ids without BOS/EOS): dict of [N, T] arrays."""
  examples = (lm_example(np.concatenate([[bos_id], np.asarray(ids, np.int32), [eos_id]]))
              for ids in docs_ids)
  return pack_examples(examples, seq_len, policy, pad_id)
