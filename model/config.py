"""Model hyper-parameters: one frozen dataclass, validated before anything compiles."""

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp


class ConfigError(ValueError):
  """A configuration that cannot work; the message names the config key."""


REMAT_POLICIES = ('none', 'full', 'dots', 'dots_no_batch', 'attn_proj')
ATTENTION_IMPLS = ('reference', 'xla', 'chunked', 'cudnn', 'splash', 'auto')
DISPATCH_IMPLS = ('capacity', 'dropless', 'reference')
GROUPED_MATMULS = ('auto', 'ragged_dot', 'gmm')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder shape. `num_experts == 0` is a dense model; > 0 turns MLPs into MoE blocks."""

  vocab_size: int = 32_000
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 4  # divides num_heads: == is MHA, 1 is MQA, between is GQA.
  head_dim: int = 0  # 0 means d_model // num_heads.
  mlp_dim: int = 1024
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  param_dtype: str = 'float32'
  compute_dtype: str = 'float32'
  scan_layers: bool = True
  remat: str = 'none'  # One of REMAT_POLICIES.
  attention: str = 'xla'  # One of ATTENTION_IMPLS.
  attention_chunk: int = 1024  # Block size of the `chunked` implementation.
  # Mixture of experts.
  num_experts: int = 0
  experts_per_token: int = 2
  moe_mlp_dim: int = 0  # 0 means mlp_dim.
  moe_every: int = 1  # Every moe_every-th layer is MoE (1: all layers).
  capacity_factor: float = 1.25
  dispatch: str = 'capacity'  # One of DISPATCH_IMPLS.
  grouped_matmul: str = 'auto'  # Dropless kernel, one of GROUPED_MATMULS (model/moe.py).
  router_jitter: float = 0.0
  load_balance_weight: float = 0.01
  router_z_weight: float = 0.001

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def expert_mlp_dim(self) -> int:
    return self.moe_mlp_dim or self.mlp_dim

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  @property
  def layers_per_unit(self) -> int:
    """Layers of the stacked unit (model/transformer.py): moe_every for MoE, else 1."""
    return self.moe_every if self.is_moe else 1

  @property
  def num_units(self) -> int:
    return self.num_layers // self.layers_per_unit

  @property
  def dtype(self):
    return jnp.dtype(self.compute_dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], prefix: str = 'model') -> 'ModelConfig':
    known = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(d) - known):
      raise ConfigError(f'unknown config key(s) {", ".join(f"{prefix}.{k}" for k in unknown)}; '
                        f'known: {", ".join(sorted(known))}')
    cfg = cls(**dict(d))
    cfg.validate(prefix)
    return cfg

  def validate(self, prefix: str = 'model') -> None:
    def need(ok, key, msg):
      if not ok:
        raise ConfigError(f'{prefix}.{key}: {msg}')
    for key in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'mlp_dim'):
      need(getattr(self, key) > 0, key, f'must be positive, got {getattr(self, key)}')
    need(self.num_heads % self.num_kv_heads == 0, 'num_kv_heads',
         f'num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}')
    need(self.head_dim > 0 or self.d_model % self.num_heads == 0, 'num_heads',
         f'num_heads={self.num_heads} must divide d_model={self.d_model} (or set model.head_dim)')
    need(self.dim_per_head % 2 == 0, 'head_dim', f'rotary embeddings need an even head dim, got {self.dim_per_head}')
    need(self.remat in REMAT_POLICIES, 'remat', f'{self.remat!r} is not one of {REMAT_POLICIES}')
    need(self.attention in ATTENTION_IMPLS, 'attention', f'{self.attention!r} is not one of {ATTENTION_IMPLS}')
    for key in ('param_dtype', 'compute_dtype'):
      try:
        floating = jnp.issubdtype(jnp.dtype(getattr(self, key)), jnp.floating)
      except TypeError:
        floating = False
      need(floating, key, f'{getattr(self, key)!r} is not a floating-point dtype')
    if self.is_moe:
      need(0 < self.experts_per_token <= self.num_experts, 'experts_per_token',
           f'must be in [1, num_experts={self.num_experts}], got {self.experts_per_token}')
      need(self.num_layers % self.moe_every == 0, 'moe_every',
           f'moe_every={self.moe_every} must divide num_layers={self.num_layers}')
      need(self.dispatch in DISPATCH_IMPLS, 'dispatch', f'{self.dispatch!r} is not one of {DISPATCH_IMPLS}')
      need(self.grouped_matmul in GROUPED_MATMULS, 'grouped_matmul',
           f'{self.grouped_matmul!r} is not one of {GROUPED_MATMULS}')
      need(self.capacity_factor > 0, 'capacity_factor', 'must be positive')
