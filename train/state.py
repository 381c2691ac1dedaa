"""The train state (params, optimizer state, step, RNG), created directly sharded: `jax.jit` of
the initialiser with out_shardings from the model's logical axes (model/sharding.py), so no
parameter ever exists unsharded."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from model.config import ModelConfig
from model.sharding import named_sharding
from model.transformer import Decoder


@dataclasses.dataclass(frozen=True)
class ModelDef:
  """How to turn a pure dict of param arrays back into a Decoder (inside or outside jit)."""
  graphdef: Any
  treedef: Any  # Of the nnx.State of params; its leaves are in the pure dict's order.
  axes: dict  # Pure dict of the logical axes of every param.
  rest: Any  # Non-param state (none for our models), kept for nnx.merge.

  def build(self, params) -> Decoder:
    state = jax.tree.unflatten(self.treedef, jax.tree.leaves(params))
    return nnx.merge(self.graphdef, state, self.rest)


def model_def(cfg: ModelConfig, model_cls=Decoder) -> tuple[ModelDef, Any]:
  """(ModelDef, abstract param pure dict); nothing is allocated."""
  abstract = nnx.eval_shape(lambda: model_cls(cfg, nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  is_var = lambda x: isinstance(x, nnx.Variable)
  axes = jax.tree.map(lambda v: v.get_metadata()['axes'], params, is_leaf=is_var)
  mdef = ModelDef(graphdef, jax.tree.structure(params), nnx.to_pure_dict(axes), rest)
  return mdef, nnx.to_pure_dict(params)


def param_shardings(mdef: ModelDef, abstract_params, mesh):
  return jax.tree.map(lambda axes, x: named_sharding(mesh, axes, x.shape), mdef.axes, abstract_params,
                      is_leaf=lambda x: isinstance(x, tuple))


def init_params(cfg: ModelConfig, key, model_cls=Decoder):
  return nnx.to_pure_dict(nnx.state(model_cls(cfg, nnx.Rngs(key)), nnx.Param))


def state_shardings(mdef: ModelDef, abstract_state, tx: optax.GradientTransformation, mesh):
  """Shardings for {'step','params','opt_state','rng'}: Adam moments follow their params. Runs
  nothing on the mesh's devices (`tx.init` under `jax.eval_shape`; they may be abstract)."""
  p_shard = param_shardings(mdef, abstract_state['params'], mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_shard = optax.tree_map_params(lambda p: jax.eval_shape(tx.init, p), lambda _, s: s,
                                    abstract_state['opt_state'], p_shard,
                                    transform_non_params=lambda _: replicated)
  return {'step': replicated, 'params': p_shard, 'opt_state': opt_shard, 'rng': replicated}


def _initialiser(cfg: ModelConfig, tx: optax.GradientTransformation, model_cls):
  def init(seed):
    key = jax.random.PRNGKey(seed)
    params = init_params(cfg, jax.random.fold_in(key, 0), model_cls)
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
            'rng': jax.random.fold_in(key, 1)}
  return init


def create(cfg: ModelConfig, tx: optax.GradientTransformation, mesh, seed: int, model_cls=Decoder):
  """Returns (state, shardings, ModelDef): the state initialised in place on the mesh."""
  _, shardings, mdef = abstract(cfg, tx, mesh, model_cls)
  init = _initialiser(cfg, tx, model_cls)
  return jax.jit(init, out_shardings=shardings, static_argnums=0)(seed), shardings, mdef


def abstract(cfg: ModelConfig, tx: optax.GradientTransformation, mesh, model_cls=Decoder):
  """`create` without allocating: (ShapeDtypeStructs carrying their shardings, shardings,
  ModelDef); the mesh's devices may be abstract ones of a compile target."""
  mdef, _ = model_def(cfg, model_cls)
  shapes = jax.eval_shape(_initialiser(cfg, tx, model_cls), 0)
  shardings = state_shardings(mdef, shapes, tx, mesh)
  return abstract_state(shardings, shapes), shardings, mdef


def abstract_state(shardings, state_like):
  """ShapeDtypeStructs with shardings: the restore target for orbax."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_like, shardings)
