"""What the post-training stages share: mesh and rules, loading models from earlier stages,
the tokenizer of the run being continued, gradient accumulation, and run bookkeeping.

Every stage uses the tokenizer of the model it starts from: `data.tokenizer` if set, else the
one model cached in the `train.init_from` run's `tokenizer/` folder (or named in its
config.json). The stage writes its own config.json (with that tokenizer path filled in), so
`python -m train.generate --checkpoint <its workdir>` and the next stage find everything.
"""

import dataclasses
import glob
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from model.heads import ScalarModel, trunk_config
from model.sharding import logical_to_spec, make_rules
from train import checkpoint as ckpt_lib
from train import generate as gen_lib
from train import state as state_lib
from train.mesh import make_mesh

log = logging.getLogger('meshlm')


@dataclasses.dataclass
class Env:
  mesh: object
  rules: dict

  def shardings(self, mdef, abstract):
    from model.sharding import use_rules
    with use_rules(self.rules):
      return state_lib.param_shardings(mdef, abstract, self.mesh)

  def batch_sharding(self, ndim: int = 2, leading: int = 0):
    """Rows over the batch axes: [leading None axes..., batch, length...]."""
    axes = (None,) * leading + ('batch',) + (None,) * (ndim - leading - 1)
    return NamedSharding(self.mesh, logical_to_spec(axes, rules=self.rules))

  @property
  def replicated(self):
    return NamedSharding(self.mesh, PartitionSpec())


def make_env(config) -> Env:
  return Env(make_mesh(config.mesh), make_rules(config.sharding_rules.to_dict()))


def run_workdir(path: str) -> str:
  return gen_lib.resolve_checkpoint(path)[2]


def stage_tokenizer_path(config) -> str:
  """data.tokenizer, else the tokenizer of the init_from run (config.json, or its cache)."""
  if config.data.tokenizer:
    return config.data.tokenizer
  workdir = run_workdir(config.train.init_from)
  path = os.path.join(workdir, 'config.json')
  if os.path.isfile(path):
    previous = gen_lib.load_config(None, workdir)
    if previous.data.tokenizer:
      return previous.data.tokenizer
  cached = sorted(glob.glob(os.path.join(workdir, 'tokenizer', '*.model')))
  if len(cached) != 1:
    raise FileNotFoundError(
        f'train.init_from={config.train.init_from}: cannot tell its tokenizer (found {cached} in '
        f'{workdir}/tokenizer); set --config.data.tokenizer=PATH.model')
  return cached[0]


def restore_lm(checkpoint: str, cfg, env: Env):
  """Decoder params of an LM checkpoint (pre-trained, SFT, PPO or DPO policy), sharded."""
  mdef, abstract = state_lib.model_def(cfg)
  root, step, _ = gen_lib.resolve_checkpoint(checkpoint)
  return ckpt_lib.restore_params(root, abstract, env.shardings(mdef, abstract), step)


def restore_trunk(checkpoint: str, cfg, env: Env):
  """The ScalarModel `decoder` params (an LM checkpoint without its output table)."""
  mdef, abstract = state_lib.model_def(trunk_config(cfg))
  root, step, _ = gen_lib.resolve_checkpoint(checkpoint)
  return ckpt_lib.restore_params(root, abstract, env.shardings(mdef, abstract), step)


def restore_scalar(checkpoint: str, cfg, env: Env):
  """ScalarModel params (a reward-model checkpoint), sharded."""
  mdef, abstract = state_lib.model_def(cfg, ScalarModel)
  root, step, _ = gen_lib.resolve_checkpoint(checkpoint)
  return ckpt_lib.restore_params(root, abstract, env.shardings(mdef, abstract), step)


def init_scalar_from_lm(checkpoint: str, cfg, env: Env, seed: int):
  """ScalarModel params: the trunk from an LM checkpoint, a freshly initialised head."""
  mdef, abstract = state_lib.model_def(cfg, ScalarModel)
  shardings = env.shardings(mdef, abstract)
  fresh = jax.jit(lambda k: state_lib.init_params(cfg, k, ScalarModel),
                  out_shardings=shardings)(jax.random.PRNGKey(seed))
  return {'decoder': restore_trunk(checkpoint, cfg, env), 'head': fresh['head']}


def accumulate(loss_fn, params, batch, extra=None):
  """Gradient and metric sums over the micro-batches on the leading axis of `batch`.

  `loss_fn(params, micro, extra) -> (loss_sum, (count, sums))`: a summed loss, how many items
  it sums over, and a dict of metric sums. Returns (grads / count, sums, count): the gradient of
  the mean over the whole batch, whatever the split into micro-batches.
  """
  grad_fn = jax.grad(loss_fn, has_aux=True)
  micro0 = jax.tree.map(lambda x: x[0], batch)
  _, sums_shape = jax.eval_shape(lambda: loss_fn(params, micro0, extra)[1])
  init = (jax.tree.map(jnp.zeros_like, params), jnp.float32(0),
          jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), sums_shape))

  def body(carry, micro):
    grads, count, sums = carry
    g, (n, s) = grad_fn(params, micro, extra)
    return (jax.tree.map(jnp.add, grads, g), count + n, jax.tree.map(jnp.add, sums, s)), None

  (grads, count, sums), _ = jax.lax.scan(body, init, batch)
  denom = jnp.maximum(count, 1.0)
  return jax.tree.map(lambda g: g / denom, grads), sums, count


def split_micro(batch: dict, grad_accum: int) -> dict:
  """[B, ...] numpy arrays -> [accum, B / accum, ...]."""
  return jax.tree.map(lambda x: np.asarray(x).reshape(grad_accum, -1, *np.shape(x)[1:]), batch)


def masked_mean(x, mask, axis=None):
  return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def brief(metrics: dict, keys) -> str:
  """'name=value ...' of the given metrics, for a log line."""
  return ' '.join(f'{k}={float(metrics[k]):.4g}' for k in keys if k in metrics)
