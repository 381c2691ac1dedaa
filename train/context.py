"""The run context: the validated config, its ModelConfig, and the mesh and logical rules, built
once at the start of a run and handed to everything that places arrays.

`Placement` is the mesh + rules pair on its own (what a tool that loads a model needs);
`RunContext` adds the run's config, ModelConfig and workdir (what a training stage needs).
"""

import dataclasses

import jax
from jax.sharding import NamedSharding, PartitionSpec

from model.config import ModelConfig
from model.sharding import logical_to_spec, make_rules, use_rules
from train import state as state_lib
from train.mesh import make_mesh


@dataclasses.dataclass(frozen=True)
class Placement:
  mesh: jax.sharding.Mesh
  rules: dict

  @classmethod
  def of(cls, config, mesh=None) -> 'Placement':
    """config.mesh (or `mesh`) and config.sharding_rules."""
    mesh = make_mesh(config.mesh) if mesh is None else mesh
    return cls(mesh, make_rules(config.sharding_rules.to_dict()))

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


def make(config, workdir: str, validate) -> RunContext:
  """Validates `config` (validate(config, devices, processes) -> ModelConfig, raising
  ConfigError before anything is built), then builds the mesh and rules once."""
  cfg = validate(config, jax.device_count(), jax.process_count())
  placement = Placement.of(config)
  return RunContext(placement.mesh, placement.rules, config=config, cfg=cfg, workdir=workdir)
