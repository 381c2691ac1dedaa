"""The device mesh, built from `config.mesh` (sizes of data, fsdp, expert, tensor; one may be -1)."""

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType

from model.config import ConfigError
from model.sharding import MESH_AXES, spec_axes


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """Resolves the one -1 entry; raises ConfigError naming `mesh.*` if the product is wrong."""
  if unknown := sorted(set(mesh_cfg) - set(MESH_AXES)):
    raise ConfigError(f'unknown mesh axis {", ".join("mesh." + k for k in unknown)}; '
                      f'axes are {", ".join(MESH_AXES)}')
  sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ConfigError(f'only one mesh axis may be -1, got {", ".join("mesh." + a for a in fill)}')
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise ConfigError(f'mesh.{a}={s}: sizes are positive (or -1 to fill)')
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % known:
      raise ConfigError(f'mesh: cannot fill mesh.{fill[0]}: {num_devices} devices are not divisible '
                        f'by the product {known} of the other axes {sizes}')
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(f'mesh: product of {sizes} is {math.prod(sizes.values())}, but there are '
                      f'{num_devices} devices; set one of mesh.data/fsdp/expert/tensor to -1 to fill')
  return sizes


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """The config's mesh over `devices` (default: all); a compile target's abstract devices are
  laid out for their physical topology (ConfigError naming `mesh.*` if they cannot be)."""
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if devices[0].platform != jax.default_backend():
    return jax.sharding.Mesh(_target_grid(shape, devices, sizes), MESH_AXES, axis_types=axis_types)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def _target_grid(shape, devices, sizes):
  """Devices of a compile target arranged as `shape`: mesh axes on whole physical axes where
  the topology allows (as jax.make_mesh does), else with physical axes split."""
  error = None
  for split in (False, True):
    try:
      return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=split)
    except (ValueError, NotImplementedError, AssertionError) as e:
      error = e
  raise ConfigError(f'mesh: {sizes} (mesh.*) cannot be laid out on the {len(devices)} '
                    f'{devices[0].device_kind} devices of the target: '
                    f'{(str(error).strip() or type(error).__name__).splitlines()[0]}')


def batch_shards(mesh: jax.sharding.Mesh, rules) -> int:
  """How many ways the batch dimension is split (product of the mesh axes `batch` maps to)."""
  return math.prod(mesh.shape[a] for a in spec_axes(rules['batch']))
