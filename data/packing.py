"""Packing tokenised examples into fixed-length rows, with segments, positions and masks.

An example is one document shifted for next-token prediction: ids `[BOS] + tokens + [EOS]` give
`inputs = ids[:-1]`, `targets = ids[1:]` and per-target `weights` (ones for pretraining text; the
assistant mask for SFT), so no target ever comes from another document.

A row of length T holds pieces of examples back to back:
  segment_ids  1, 2, 3, ... for the pieces in the row, 0 on padding;
  positions    restarting at 0 at the start of every piece;
  loss_mask    the example's weights on real tokens, 0.0 on padding;
  inputs/targets  the tokens, `pad_id` on padding.
An example cut at a row's end continues in the next row as a segment of its own, positions from
0 (only the first piece has the BOS). Policies:
  'concat'  fill every row to the end; padding only at the very end. The pretraining default.
  'pad'     an example that does not fit in what is left of a non-empty row moves whole to the
            next row, the rest is padding; only examples longer than T are cut. For SFT.
"""

import contextlib
from typing import Callable, Iterator, Mapping

import numpy as np

POLICIES = ('concat', 'pad')
FEATURES = ('inputs', 'targets', 'positions', 'segment_ids', 'loss_mask')


def lm_example(ids: np.ndarray | list[int], weights: np.ndarray | None = None) -> dict:
  """The shifted example of one document `ids` (BOS/EOS in place); `weights` (one per id, default
  ones) say what is learned: target `ids[i]` has weight `weights[i]` (i >= 1)."""
  ids = np.asarray(ids, np.int32)
  if ids.ndim != 1 or ids.shape[0] < 2:
    raise ValueError(f'a document needs at least 2 ids (BOS and EOS), got shape {ids.shape}')
  weights = np.ones(ids.shape, np.float32) if weights is None else np.asarray(weights, np.float32)
  if weights.shape != ids.shape:
    raise ValueError(f'weights shape {weights.shape} differs from ids shape {ids.shape}')
  return {'inputs': ids[:-1], 'targets': ids[1:], 'weights': weights[1:]}


class RowPacker:
  """Builds rows from a stream of examples. `pending` is the example being consumed, `offset`
  how much of it went into earlier rows: all a checkpoint needs (with `pending`'s position)."""

  def __init__(self, seq_len: int, policy: str = 'concat', pad_id: int = 0):
    if seq_len < 1:
      raise ValueError(f'seq_len must be positive, got {seq_len}')
    if policy not in POLICIES:
      raise ValueError(f'packing policy {policy!r} is not one of {POLICIES}')
    self.seq_len, self.policy, self.pad_id = seq_len, policy, pad_id
    self.pending: Mapping[str, np.ndarray] | None = None
    self.offset = 0

  def reset(self, pending: Mapping[str, np.ndarray] | None = None, offset: int = 0) -> None:
    self.pending, self.offset = pending, offset

  def pack(self, next_example: Callable[[], Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One row of length T, calling `next_example()` for each new example; its StopIteration
    ends the row with padding, or propagates from a row with nothing in it."""
    t = self.seq_len
    pieces, filled = [], 0  # pieces: {'inputs', 'targets', 'weights'} slices of examples.
    while filled < t:
      if self.pending is None:
        try:
          example = next_example()
        except StopIteration:
          if not pieces:
            raise
          break
        n = example['inputs'].shape[0]
        if n == 0:
          continue
        self.pending, self.offset = example, 0
        if self.policy == 'pad' and filled and n > t - filled:
          break
      ex, start = self.pending, self.offset
      n = ex['inputs'].shape[0]
      take = min(n - start, t - filled)
      pieces.append({k: ex[k][start:start + take] for k in ('inputs', 'targets', 'weights')})
      filled += take
      self.pending, self.offset = (None, 0) if start + take == n else (ex, start + take)
    return _assemble(pieces, t, self.pad_id)


def _assemble(pieces: list[dict], t: int, pad_id: int) -> dict[str, np.ndarray]:
  lengths = np.asarray([p['inputs'].shape[0] for p in pieces], np.int32)
  filled, pad = int(lengths.sum()), t - int(lengths.sum())
  segment_ids, positions = np.zeros(t, np.int32), np.zeros(t, np.int32)
  segment_ids[:filled] = np.repeat(np.arange(1, len(lengths) + 1, dtype=np.int32), lengths)
  starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
  positions[:filled] = np.arange(filled, dtype=np.int32) - starts
  row = lambda key, fill, dtype: np.concatenate(
      [p[key] for p in pieces] + [np.full(pad, fill, dtype)]).astype(dtype)
  return {'inputs': row('inputs', pad_id, np.int32), 'targets': row('targets', pad_id, np.int32),
          'loss_mask': row('weights', 0.0, np.float32), 'segment_ids': segment_ids,
          'positions': positions}


def pack_examples(examples: Iterator[Mapping[str, np.ndarray]] | list, seq_len: int,
                  policy: str = 'concat', pad_id: int = 0) -> dict[str, np.ndarray]:
  """Packs a finite list of examples into as many rows as they need: dict of [N, T] arrays."""
  packer = RowPacker(seq_len, policy, pad_id)
  it = iter(examples)
  rows = []
  with contextlib.suppress(StopIteration):
    while True:
      rows.append(packer.pack(lambda: next(it)))
  if not rows:
    return {k: np.zeros((0, seq_len), np.float32 if k == 'loss_mask' else np.int32)
            for k in FEATURES}
  return stack_rows(rows)


def stack_rows(rows) -> dict[str, np.ndarray]:
  """Rows (dicts of [T] arrays) as one dict of [N, T] arrays."""
  return {k: np.stack([r[k] for r in rows]) for k in FEATURES}
