"""Small builders shared by tests: tiny configs, synthetic packed batches, meshes."""

import jax
import jax.numpy as jnp
import numpy as np

from model import ModelConfig
from train import mesh as mesh_lib


def tiny_cfg(**kw) -> ModelConfig:
  base = dict(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
              attention='xla')
  base.update(kw)
  return ModelConfig(**base)


def packed_batch(batch: int, length: int, vocab: int, seed: int = 0, docs_per_row: int = 3) -> dict:
  """Rows of `docs_per_row` random-length documents, with segment ids, positions, a tail of
  padding, next-token targets inside each document and a loss mask."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(1, vocab, (batch, length)).astype(np.int32)
  targets = rng.integers(1, vocab, (batch, length)).astype(np.int32)
  segment_ids = np.zeros((batch, length), np.int32)
  positions = np.zeros((batch, length), np.int32)
  for b in range(batch):
    cuts = np.sort(rng.choice(np.arange(2, length - 2), docs_per_row, replace=False))
    start = 0
    for d, end in enumerate(cuts, start=1):
      segment_ids[b, start:end] = d
      positions[b, start:end] = np.arange(end - start)
      start = end
  return {'inputs': inputs, 'targets': targets, 'positions': positions, 'segment_ids': segment_ids,
          'loss_mask': (segment_ids > 0).astype(np.float32)}


def mesh(**sizes):
  full = dict(data=1, fsdp=1, expert=1, tensor=1)
  full.update(sizes)
  n = int(np.prod(list(full.values())))
  return mesh_lib.make_mesh(full, devices=jax.devices()[:n])


def max_abs_diff(a, b) -> float:
  return max(float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
