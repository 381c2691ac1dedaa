"""The run context, the one place that builds mesh and logical rules from a config: once at the
start of a run, plan or compile, then handed to everything that places arrays. `Placement` is mesh +
rules (planning: on an AbstractMesh); `RunContext` adds the validated config, ModelConfig, workdir.
"""

import dataclasses

import jax
from jax.sharding import NamedSharding, PartitionSpec

from model.config import ModelConfig
from model.sharding import MESH_AXES, logical_to_spec, make_rules, use_rules
from train import state as state_lib
from train.mesh import batch_shards, make_mesh


@dataclasses.dataclass(frozen=True)
class Placement:
  mesh: jax.sharding.Mesh
  rules: dict

  @classmethod
  def of(cls, config, mesh=None) -> 'Placement':
    """config.mesh (or `mesh`) and config.sharding_rules."""
    mesh = make_mesh(config.mesh) if mesh is None else mesh
    return cls(mesh, make_rules(config.sharding_rules.to_dict()))

  @classmethod
  def abstract(cls, config, sizes: dict) -> 'Placement':
    """config.sharding_rules on an AbstractMesh of `sizes` (axis -> size, default 1): no devices."""
    shape = tuple(int(sizes.get(a, 1)) for a in MESH_AXES)
    return cls(jax.sharding.AbstractMesh(shape, MESH_AXES), make_rules(config.sharding_rules.to_dict()))

  @property
  def batch_shards(self) -> int:
    return batch_shards(self.mesh, self.rules)

  def param_shardings(self, mdef, abstract_params):
    with use_rules(self.rules):
      return state_lib.param_shardings(mdef, abstract_params, self.mesh)

  def batch_sharding(self, ndim: int) -> NamedSharding:
    """A [accum, batch, length, ...] array of `ndim` axes: rows over the batch axes, the length
    axis by the `length` rule, the accumulation axis and the rest replicated."""
    axes = ((None, 'batch', 'length') + (None,) * ndim)[:ndim]
    return NamedSharding(self.mesh, logical_to_spec(axes, rules=self.rules))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())


@dataclasses.dataclass(frozen=True)
class RunContext(Placement):
  config: object = None
  cfg: ModelConfig = None
  workdir: str = ''


def make(config, workdir: str, validate, devices=None) -> RunContext:
  """validate(config, devices, processes) -> ModelConfig (ConfigError before anything is built),
  then the mesh over `devices` (default: all; or a compile target's abstract ones) and the rules."""
  devices = jax.devices() if devices is None else devices
  cfg = validate(config, len(devices), jax.process_count())
  placement = Placement.of(config, make_mesh(config.mesh, devices))
  return RunContext(placement.mesh, placement.rules, config=config, cfg=cfg, workdir=workdir)
