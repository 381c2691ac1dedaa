"""The one table that maps logical axis names to mesh axes, and the helpers that apply it.

Model code names axes logically (`embed`, `heads`, ...), never a mesh axis: a run's parallelism
is RULES with the config's `sharding_rules` overrides. Mesh axes: `data` (data parallel),
`fsdp` (data parallel + parameter/optimizer sharding, ZeRO-3), `expert` (expert parallel; data
parallel for the rest), `tensor` (Megatron-style heads and MLP width).
"""

import contextlib
import contextvars
from typing import Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

from model.config import ConfigError

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated).
RULES: dict[str, str | tuple[str, ...] | None] = {
    # Parameters.
    'vocab': 'tensor', 'embed': 'fsdp', 'heads': 'tensor', 'kv_heads': 'tensor',
    'head_dim': None, 'mlp': 'tensor',
    'expert': 'expert', 'expert_embed': 'fsdp', 'expert_mlp': 'tensor',
    'norm': None, 'layers': None,
    # Activations ('length': 'tensor' shards long contexts over the sequence).
    'batch': ('data', 'fsdp', 'expert'), 'length': None, 'act_embed': None,
    'act_heads': 'tensor', 'act_kv_heads': 'tensor', 'act_mlp': 'tensor', 'act_vocab': 'tensor',
    'act_expert': 'expert', 'capacity': None,
}

_rules = contextvars.ContextVar('meshlm_rules', default=RULES)


def make_rules(overrides: Mapping[str, object] | None = None) -> dict:
  """RULES with entries replaced by `overrides` (e.g. the config's `sharding_rules`)."""
  rules = dict(RULES)
  for name, target in (overrides or {}).items():
    if name not in RULES:
      raise ConfigError(f'sharding_rules.{name}: unknown logical axis; known: {", ".join(RULES)}')
    rules[name] = tuple(target) if isinstance(target, (list, tuple)) else target
  return rules


@contextlib.contextmanager
def use_rules(rules: Mapping[str, object]):
  token = _rules.set(dict(rules))
  try:
    yield
  finally:
    _rules.reset(token)


def spec_axes(target) -> tuple[str, ...]:
  """A rule target or PartitionSpec entry (None, 'axis' or a tuple) as a tuple of mesh axes."""
  return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh=None,
                    rules: Mapping[str, object] | None = None) -> PartitionSpec:
  """PartitionSpec for logical `axes`. With `shape` and `mesh`, mesh axes of size 1 or that do
  not divide the dimension (kv_heads=1 over tensor=2) are dropped: it is replicated instead."""
  rules = _rules.get() if rules is None else rules
  used: set[str] = set()
  spec = []
  for i, name in enumerate(axes):
    mesh_axes = [a for a in spec_axes(rules.get(name) if name else None) if a not in used]
    if mesh is not None:
      mesh_axes = [a for a in mesh_axes if a in mesh.shape and mesh.shape[a] > 1]
      if shape is not None:
        kept, size = [], 1
        for a in mesh_axes:
          if shape[i] % (size * mesh.shape[a]) == 0:
            kept.append(a)
            size *= mesh.shape[a]
        mesh_axes = kept
    used.update(mesh_axes)
    spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
  return PartitionSpec(*spec)


def named_sharding(mesh, axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def mesh_platform() -> str:
  """The platform being compiled for: the `jax.set_mesh` mesh's (maybe abstract devices of a
  compile target, train/aot.py), else JAX's default backend. Kernel choices read this."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


def constrain(x: jax.Array, axes: Sequence[str | None] | None) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op for axes None or when no mesh is set."""
  mesh = jax.sharding.get_abstract_mesh()
  if axes is None or mesh.empty or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))
