"""orbax checkpoints: async saves every N steps and at the end, keep the last K, restore the
latest (onto any mesh: the restore target carries the current run's shardings).

A checkpoint holds the train state (step, params, optimizer state, RNG) and, as JSON, the data
iterator's position, so a resumed run sees exactly the batches it would have seen.
"""

import logging
import os

import jax
import orbax.checkpoint as ocp
from etils import epath

from model.config import ConfigError

from train.state import abstract_state

log = logging.getLogger(__name__)


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'data'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict | None, *, force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state or {}))
    return self.manager.save(step, args=args, force=force)

  def restore(self, state_like, shardings, step: int | None = None):
    """(state, data_state) of `step` (default: latest), placed with `shardings`."""
    step = self.latest_step() if step is None else step
    target = abstract_state(shardings, state_like)
    check_shapes(os.path.join(self.directory, str(step)), target)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    log.info('restored step %d from %s', step, self.directory)
    return restored['state'], restored['data']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params(directory: str, abstract_params, param_shardings, step: int | None = None):
  """Only the params of a checkpoint (for `train.init_from`): the optimizer state is not read."""
  directory = os.path.abspath(directory)
  manager = ocp.CheckpointManager(directory, item_names=('state', 'data'))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'train.init_from={directory}: no checkpoint found there')
  target = {'params': jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                   abstract_params, param_shardings)}
  check_shapes(os.path.join(directory, str(step)), target)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                     partial_restore=True)))
  manager.close()
  return restored['state']['params']


def check_shapes(where: str, target) -> None:
  """A clear error when the run's model no longer matches the checkpoint's params (before orbax
  fails with a message naming neither)."""
  stored = ocp.PyTreeCheckpointHandler().metadata(epath.Path(where) / 'state')
  stored_shapes = {jax.tree_util.keystr(k): tuple(m.shape)
                   for k, m in jax.tree_util.tree_flatten_with_path(stored['params'])[0]}
  for key, x in jax.tree_util.tree_flatten_with_path(target['params'])[0]:
    name = jax.tree_util.keystr(key)
    if name not in stored_shapes:
      raise ConfigError(f'checkpoint {where} has no {name}: the model config (model.*) differs from '
                        f'the one that wrote it')
    if stored_shapes[name] != tuple(x.shape):
      raise ConfigError(f'checkpoint {where}: {name} has shape {stored_shapes[name]} but this run\'s '
                        f'model expects {tuple(x.shape)}; model.* differs from the run that wrote it '
                        f'(use a new workdir, or the same model config)')
