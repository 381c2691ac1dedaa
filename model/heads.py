"""Scalar heads on the decoder: reward models and PPO critics.

`ScalarModel`: a `Decoder` trunk (`tie_embeddings=True`: no `head_dv`) and a linear head, one float
per position. Params: `{'decoder': <Decoder params minus head_dv>, 'head': {'w_d', 'bias'}}`;
`decoder` loads from an LM checkpoint of the same shape.
"""

import dataclasses

import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.layers import param
from model.transformer import Decoder


class ScalarHead(nnx.Module):
  """h_btd -> float32 [b, t]: h . w + bias (computed in float32)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.w_d = param(rngs, (cfg.d_model,), ('embed',), cfg.weight_dtype)
    self.bias = param(rngs, (1,), (None,), cfg.weight_dtype, init='zeros')

  def __call__(self, h_btd):
    w_d, bias = self.w_d[...].astype(jnp.float32), self.bias[...][0].astype(jnp.float32)
    return jnp.einsum('btd,d->bt', h_btd.astype(jnp.float32), w_d) + bias


class ScalarModel(nnx.Module):
  """tokens [b, t] (+ positions, segment ids) -> (float32 scores [b, t], aux dict)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.decoder = Decoder(trunk_config(cfg), rngs)
    self.head = ScalarHead(cfg, rngs)

  def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None, rng=None):
    h_btd, aux = self.decoder.hidden(tokens_bt, positions_bt, segment_ids_bt, rng)
    return self.head(h_btd), aux


def trunk_config(cfg: ModelConfig) -> ModelConfig:
  """The decoder config of a ScalarModel: the same shape without an output table."""
  return dataclasses.replace(cfg, tie_embeddings=True)


def last_index(mask_bt):
  """int32 [b]: each row's last column with a nonzero mask (0 if none), wherever the padding is."""
  col_bt = jnp.arange(mask_bt.shape[1], dtype=jnp.int32)[None, :]
  return jnp.max(jnp.where(mask_bt > 0, col_bt, 0), axis=1).astype(jnp.int32)


def at_index(x_bt, index_b):
  """x[b, index[b]] for every row."""
  return jnp.take_along_axis(x_bt, index_b[:, None], axis=1)[:, 0]
