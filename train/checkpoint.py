"""Verified orbax checkpoints: a save every N steps and at the end, the last K kept, the newest
intact step restored (onto any mesh: the restore target carries the current run's shardings).

A step N/ holds the train state, the data iterator's position as JSON and `checksums.json`
(size and CRC-32 of every other file, written once orbax committed the step). Guarantees:
- `save` returns once the step is committed and checksummed: a kill -9 loses at most one interval.
- Restore verifies a step's checksums first. A step that fails, or that orbax / tensorstore cannot
  read, is named in one warning, moved aside to `N.damaged`, and the next older one is tried;
  nothing is deleted. None intact: a ConfigError naming each step's damage, nothing moved. A step
  without checksums.json (killed just after orbax's commit) is read with a warning; an empty step
  directory is damaged.
"""

import concurrent.futures
import json
import logging
import os
import zlib

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from model.config import ConfigError

from train.state import abstract_state

log = logging.getLogger(__name__)

ITEMS = ('state', 'data')
CHECKSUMS = 'checksums.json'


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict | None, *, force: bool = False) -> bool:
    """Writes `step`; returns (True if it saved) once it is committed and checksummed."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state or {}))
    saved = self.manager.save(step, args=args, force=force)
    if saved and jax.process_index() == 0:
      write_checksums(os.path.join(self.directory, str(step)))
    return saved

  def restore(self, state_like, shardings, step: int | None = None):
    """(state, data_state) of `step` (default: the newest intact one), placed with `shardings`."""
    target = abstract_state(shardings, state_like)

    def read(step, where):
      check_shapes(where, target, exact=True)
      return self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))

    step, restored = restore_intact(self.manager, read, step)
    log.info('restored step %d from %s', step, self.directory)
    return restored['state'], restored['data']

  def close(self):
    self.manager.close()


def restore_params(directory: str, abstract_params, param_shardings, step: int | None = None):
  """Only the params of a checkpoint (no optimizer state); `step` defaults to the newest intact."""
  manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=ITEMS)
  target = {'params': abstract_state(param_shardings, abstract_params)}

  def read(step, where):
    check_shapes(where, target)
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))

  try:
    return restore_intact(manager, read, step)[1]['state']['params']
  finally:
    manager.close()


def restore_intact(manager, read, step: int | None = None):
  """(step, read(step, its directory)) of `step` or the newest intact step (module doc)."""
  root = os.fspath(manager.directory)
  steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
  damaged = []
  for s in steps:
    where = os.path.join(root, str(s))
    try:
      verify(where)
      result = read(s, where)
    except ConfigError:  # The run's config does not fit an intact step: not damage.
      raise
    except Exception as e:  # Whatever orbax, tensorstore or the OS raise reading it.
      damaged.append((s, where, f'{e}'.strip().split('\n')[0][:300] or type(e).__name__))
      continue
    if damaged:
      for bad, path, why in damaged if jax.process_index() == 0 else ():
        log.warning('checkpoint step %d is damaged (%s): moved aside to %s; falling back to step %d',
                    bad, why, move_aside(path), s)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices('meshlm checkpoint fallback')
      manager.reload()
    return s, result
  if not damaged:
    raise ConfigError(f'{root}: no checkpoint there')
  raise ConfigError(f'no intact checkpoint in {root}: ' + '; '.join(
      f'step {s}: {why}' for s, _, why in damaged) + ' (nothing was moved or deleted: move the damaged steps away, or use a new workdir)')


def verify(where: str) -> None:
  """Raises (naming the first file that differs) unless the files of step directory `where` are
  those its checksums.json lists; a step without checksums passes with a warning."""
  path = os.path.join(where, CHECKSUMS)
  if not os.path.isfile(path):
    if not os.path.isdir(where) or not os.listdir(where):
      raise FileNotFoundError('the step directory is empty')
    log.warning('checkpoint %s has no %s (written before checksums, or killed just after orbax '
                'committed it): restoring it unverified', where, CHECKSUMS)
    return
  try:
    with open(path) as f:
      expected = json.load(f)
  except ValueError as e:
    raise ValueError(f'{CHECKSUMS} is not valid JSON ({e})') from e

  def problem(item):
    name, (size, crc) = item
    file = os.path.join(where, name)
    if not os.path.isfile(file):
      return f'{name} is missing'
    if os.path.getsize(file) != size:
      return f'{name} has {os.path.getsize(file)} bytes, {size} were written'
    return None if file_crc(file) == crc else f'{name} does not match its checksum'

  with concurrent.futures.ThreadPoolExecutor(8) as pool:  # zlib releases the GIL.
    problems = [p for p in pool.map(problem, sorted(expected.items())) if p]
  if problems:
    more = f' (and {len(problems) - 1} more files)' if len(problems) > 1 else ''
    raise ValueError(problems[0] + more)


def write_checksums(where: str) -> None:
  """checksums.json in step directory `where`: {relative path: [size, CRC-32]} of every file."""
  names = sorted({os.path.relpath(os.path.join(d, f), where)
                  for d, _, files in os.walk(where) for f in files} - {CHECKSUMS})
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    crcs = pool.map(lambda n: file_crc(os.path.join(where, n)), names)
    sums = {n: [os.path.getsize(os.path.join(where, n)), c] for n, c in zip(names, crcs)}
  path = os.path.join(where, CHECKSUMS)
  with open(path + '.tmp', 'w') as f:
    json.dump(sums, f)
  os.replace(path + '.tmp', path)


def file_crc(path: str) -> int:
  crc = 0
  with open(path, 'rb') as f:
    while chunk := f.read(16 << 20):
      crc = zlib.crc32(chunk, crc)
  return crc


def move_aside(path: str) -> str:
  """Renames step directory `path` to `path.damaged` (`.damaged2`, ... when taken)."""
  aside, n = path + '.damaged', 1
  while os.path.exists(aside):
    n += 1
    aside = f'{path}.damaged{n}'
  os.rename(path, aside)
  return aside


def check_shapes(where: str, target, exact: bool = False) -> None:
  """A clear error when the run's model no longer matches the checkpoint's params (before orbax
  fails with a message naming neither); `exact`: the checkpoint may hold no other params."""
  shapes = lambda tree: {jax.tree_util.keystr(k): tuple(x.shape)
                         for k, x in jax.tree_util.tree_flatten_with_path(tree['params'])[0]}
  stored_shapes = shapes(ocp.PyTreeCheckpointHandler().metadata(epath.Path(where) / 'state'))
  wanted = shapes(target)
  differs = 'model.* differs from the run that wrote it (use a new workdir, or the same model config)'
  for name, shape in wanted.items():
    if name not in stored_shapes:
      raise ConfigError(f'checkpoint {where} has no {name}: {differs}')
    if stored_shapes[name] != shape:
      raise ConfigError(f'checkpoint {where}: {name} has shape {stored_shapes[name]} but this run\'s '
                        f'model expects {shape}; {differs}')
  extra = sorted(set(stored_shapes) - set(wanted)) if exact else []
  if extra:
    raise ConfigError(f'checkpoint {where} has {extra[0]}, which this run\'s model lacks (e.g. '
                      f'model.tie_embeddings changed): {differs}')
