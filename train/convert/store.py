"""meshlm checkpoints written and read piecewise, so that no whole model is ever in host memory.

Writing (import, `save_params`): numpy memmaps as step 0 of a `checkpoints/` folder laid out like
the training loop's (items `state` = {'params': ...}, `data` = {}), in chunks of at most
`chunk_bytes`. Reading (export, `StoredParams`): one slice at a time through tensorstore.
"""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from train.checkpoint import write_checksums

STEP = 0
CHUNK_BYTES = 64 << 20


def save_params(root: str, params: dict, stacked_axes: dict, *, chunk_bytes: int = CHUNK_BYTES):
  """Saves the pure dict `params` (numpy arrays or memmaps) as step 0 of the checkpoints folder
  `root`. `stacked_axes` (same tree): how many leading axes (layer, expert) to chunk first."""
  # numpy arrays saved without a defensive copy (jax.Array listed only against an orbax warning).
  registry = ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
      (jax.Array, ocp.type_handlers.ArrayHandler()))
  state = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_ocdbt=False)
  handlers = {'state': state, 'data': ocp.JsonCheckpointHandler()}
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
  save_args = jax.tree.map(
      lambda x, n: ocp.SaveArgs(chunk_byte_size=chunk_bytes, shard_axes=tuple(range(n))),
      params, stacked_axes)
  manager = ocp.CheckpointManager(os.path.abspath(root), options=options, item_handlers=handlers)
  manager.save(STEP, args=ocp.args.Composite(
      state=ocp.args.PyTreeSave({'params': params}, save_args={'params': save_args}),
      data=ocp.args.JsonSave({})))
  manager.wait_until_finished()
  manager.close()
  write_checksums(os.path.join(os.path.abspath(root), str(STEP)))


class StoredParams:
  """The params of one saved step (`root/step/state`), opened lazily with tensorstore."""

  def __init__(self, root: str, step: int):
    self.directory = os.path.join(os.path.abspath(root), str(step), 'state')
    meta_path = os.path.join(self.directory, '_METADATA')
    if not os.path.isfile(meta_path):
      raise FileNotFoundError(f'{self.directory}: no orbax _METADATA; not a meshlm checkpoint step')
    with open(meta_path) as f:
      meta = json.load(f)
    self.use_ocdbt, self.use_zarr3 = bool(meta.get('use_ocdbt')), bool(meta.get('use_zarr3'))
    keys = [tuple(k['key'] for k in e['key_metadata']) for e in meta['tree_metadata'].values()]
    self.names = {k[1:] for k in keys if k[0] == 'params'}
    self.context = ocp.type_handlers.get_ts_context(use_ocdbt=self.use_ocdbt)
    self._open = {}

  def array(self, path: tuple[str, ...]):
    """The tensorstore of param `path` (opened once); index it and `.read().result()`."""
    if path not in self.names:
      raise KeyError(f'{self.directory}: no parameter {"/".join(path)} (has: '
                     f'{", ".join(sorted("/".join(p) for p in self.names))})')
    if path not in self._open:
      info = ocp.type_handlers.ParamInfo(
          name='.'.join(('params',) + path), parent_dir=epath.Path(self.directory),
          is_ocdbt_checkpoint=self.use_ocdbt, use_zarr3=self.use_zarr3, ts_context=self.context)
      spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self.use_ocdbt)
      self._open[path] = ts.open(spec, open=True, read=True, context=self.context).result()
    return self._open[path]

  def shape(self, path) -> tuple[int, ...]:
    return tuple(self.array(path).shape)

  def dtype(self, path) -> np.dtype:
    return np.dtype(self.array(path).dtype.numpy_dtype)

  def read_slice(self, path, index: tuple[int, ...]) -> np.ndarray:
    return np.asarray(self.array(path)[index].read().result())
