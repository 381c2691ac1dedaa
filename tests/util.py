"""Small builders shared by tests: tiny configs, synthetic packed batches, meshes."""

import importlib

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
  return max(float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def run_config(**train_overrides):
  """A complete tiny run config (embedded data, small tokenizer) for loop-level tests."""
  from train.config import defaults
  c = defaults()
  c.model.update(vocab_size=512, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
  c.data.update(seq_len=32, tokenizer_docs=400, embedded_docs=2_000, embedded_eval_docs=50)
  c.mesh.update(data=1, fsdp=-1, expert=1, tensor=1)
  c.optim.update(peak_lr=1e-2, warmup_steps=2)
  c.train.update(steps=6, global_batch=8, log_every=1, ckpt_every=3, eval_batches=1, progress=False)
  c.train.update(train_overrides)
  return c


SMALL = dict(vocab_size=512, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)


def stage_config(name: str, **train):
  """experiments/<name>.py's config at the SMALL model and a small embedded corpus, stepping
  `train` (default 2 steps of 8, a checkpoint at the end) — the tiny post-training chain."""
  c = importlib.import_module(f'experiments.{name}').get_config()
  c.model.update(SMALL)
  c.data.update(seq_len=64, tokenizer_docs=300, embedded_docs=400, embedded_examples=200,
                embedded_eval_docs=40)
  c.optim.update(warmup_steps=1)
  c.train.update({**dict(steps=2, log_every=1, ckpt_every=2, eval_batches=1, global_batch=8), **train})
  c.train.progress = False
  return c
