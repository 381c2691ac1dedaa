"""Parameter counts (from `jax.eval_shape`, nothing allocated) and FLOPs per token.

Training FLOPs per token = 3 x forward (forward + backward), with
  forward = 2 x (matmul parameters touched by one token)           [projections, MLP/experts, head]
          + 4 x layers x heads x head_dim x (mean keys attended)   [q.k and p.v]
Causal attention over T tokens counts (T + 1) / 2 keys per query (masked-out work does not inflate
MFU); MoE layers count only the k active experts plus the router, `dense_equivalent` all E.
"""

import dataclasses
import math

import jax
from flax import nnx

from model.config import ModelConfig
from model.transformer import Decoder


@dataclasses.dataclass(frozen=True)
class ParamCount:
  total: int
  active: int  # Parameters one token touches (k of E experts).
  embedding: int  # The input table (a lookup, no matmul FLOPs).


def count_params(cfg: ModelConfig) -> ParamCount:
  abstract = nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0)))  # Nothing allocated.
  leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  total = sum(math.prod(x.shape) for _, x in leaves)
  expert = sum(math.prod(x.shape) for path, x in leaves
               if any(getattr(p, 'key', None) in ('gate_edf', 'up_edf', 'down_efd') for p in path))
  inactive = expert * (cfg.num_experts - cfg.experts_per_token) // cfg.num_experts if cfg.is_moe else 0
  return ParamCount(total=total, active=total - inactive, embedding=cfg.vocab_size * cfg.d_model)


@dataclasses.dataclass(frozen=True)
class Flops:
  per_token: float  # Training FLOPs per token, active experts only.
  dense_equivalent: float  # Same, as if every expert ran on every token.
  attention_per_token: float


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> Flops:
  counts = count_params(cfg)
  # Matmul parameters: everything but the input table (a gather) and the norm scales.
  norms = (2 * cfg.num_layers + 1) * cfg.d_model
  lookup = 0 if cfg.tie_embeddings else counts.embedding  # Tied: the table is the head matmul.
  attention = 4 * cfg.num_layers * cfg.num_heads * cfg.dim_per_head * (seq_len + 1) / 2
  return Flops(per_token=3 * (2 * (counts.active - lookup - norms) + attention),
               dense_equivalent=3 * (2 * (counts.total - lookup - norms) + attention),
               attention_per_token=3 * attention)
