"""orbax checkpoints: async saves every N steps and at the end, keep the last K, restore the
latest (onto any mesh: the restore target carries the current run's shardings).

A checkpoint holds the train state (step, params, optimizer state, RNG) and, as JSON, the data
iterator's position, so a resumed run sees exactly the batches it would have seen.
"""

import logging
import os

import jax
import orbax.checkpoint as ocp

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
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                     partial_restore=True)))
  manager.close()
  return restored['state']['params']
