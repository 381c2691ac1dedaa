"""Compile targets: accelerators that are not attached, as abstract devices, and their chip facts.

A target is written `PLATFORM:CHIP:TOPOLOGY`, e.g. `tpu:v5p:8x8x8` (512 v5p chips), `tpu:v5e:16x16`,
`gpu:h100:512`. `abstract_devices(target)` asks libtpu (extra `.[tpu]`) or the CUDA PJRT plugin
(extra `.[gpu-plan]`, given a GpuTargetConfigProto from GPUS: `gpu_target_config`) for the target's
compile-only devices: the real compiler runs for them on a CPU-only host (train/aot.py, plan.py).

CHIPS: from Google Cloud's TPU specifications (ICI: Gbps / 8) and NVIDIA's SXM data sheets (NVLink
per GPU; `wide_gbps`: InfiniBand per GPU, between hosts of 8). Per-device figures are the chip's
over `devices_per_chip` (TPU v4: two TensorCores).
"""

import contextlib
import dataclasses
import math
import os
from unittest import mock

from jax.experimental import topologies

from model.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_gib: float
  peak_tflops: float  # bf16, dense.
  hbm_gbps: float  # GB/s.
  ici_gbps: float  # GB/s per chip for collectives (TPU: ICI; GPU: NVLink).
  wide_gbps: float = 0.0  # GPU: GB/s per GPU between hosts (0: the whole target is ICI).


CHIPS = {
    'tpu:v4': Chip(hbm_gib=32, peak_tflops=275, hbm_gbps=1228, ici_gbps=300),
    'tpu:v5e': Chip(hbm_gib=16, peak_tflops=197, hbm_gbps=819, ici_gbps=200),
    'tpu:v5p': Chip(hbm_gib=95, peak_tflops=459, hbm_gbps=2765, ici_gbps=600),
    'tpu:v6e': Chip(hbm_gib=32, peak_tflops=918, hbm_gbps=1640, ici_gbps=448),
    'gpu:a100': Chip(hbm_gib=79.25, peak_tflops=312, hbm_gbps=2039, ici_gbps=300, wide_gbps=25),
    'gpu:h100': Chip(hbm_gib=79.1, peak_tflops=989, hbm_gbps=3352, ici_gbps=450, wide_gbps=50),
}
GPUS_PER_HOST = 8

# What XLA:GPU needs to know of a GPU it cannot query: the GpuDeviceInfoProto fields JAX 0.10.2's
# plugin parses, from NVIDIA's data sheets.
GPUS = {
    'a100': dict(name='NVIDIA A100-SXM4-80GB', cc=(8, 0, 'NONE'), core_count=108, fpus_per_core=64,
                 shared_memory_per_core=167936, shared_memory_per_block_optin=166912,
                 memory_bandwidth=2039040000000, l2_cache_size=41943040, clock_rate_ghz=1.41,
                 device_memory_size=85100068864),
    'h100': dict(name='NVIDIA H100 80GB HBM3', cc=(9, 0, 'ACCELERATED_FEATURES'), core_count=132,
                 fpus_per_core=128, shared_memory_per_core=233472,
                 shared_memory_per_block_optin=232448, memory_bandwidth=3352320000000,
                 l2_cache_size=52428800, clock_rate_ghz=1.98, device_memory_size=84942979072),
}
CUDNN_VERSION = (9, 10, 0)  # The cuDNN the compiled program is for (jax[cuda12]==0.10.2's).


def gpu_target_config(chip: str) -> str:
  """GpuTargetConfigProto (text format) for one of GPUS."""
  g = GPUS[chip]
  major, minor, extension = g['cc']
  dnn = '.'.join(str(v) for v in CUDNN_VERSION)
  lines = ['gpu_device_info {', '  threads_per_block_limit: 1024', '  threads_per_warp: 32',
           '  shared_memory_per_block: 49152', '  threads_per_core_limit: 2048',
           '  block_dim_limit_x: 2147483647', '  block_dim_limit_y: 65535',
           '  block_dim_limit_z: 65535', '  registers_per_core_limit: 65536',
           '  registers_per_block_limit: 65536', '  thread_dim_limit_x: 1024',
           '  thread_dim_limit_y: 1024', '  thread_dim_limit_z: 64']
  lines += [f'  {key}: {value}' for key, value in g.items() if key not in ('name', 'cc')]
  lines += ['  cuda_compute_capability {', f'    major: {major}', f'    minor: {minor}',
            f'    feature_extension: {extension}', '  }', f'  dnn_version: "{dnn}"', '}',
            'platform_name: "CUDA"', 'dnn_version_info {', f'  major: {CUDNN_VERSION[0]}',
            f'  minor: {CUDNN_VERSION[1]}', f'  patch: {CUDNN_VERSION[2]}', '}',
            f'device_description_str: "{g["name"]}"']
  return '\n'.join(lines) + '\n'


@contextlib.contextmanager
def compile_context(target):
  """While tracing for a GPU target: JAX's cuDNN-attention checks answered for the target (its
  cuDNN version, its compute capability) instead of the absent local library and GPU."""
  if target.platform != 'gpu':
    yield
    return
  from jax._src.cudnn import fused_attention_stablehlo as fused  # The checks live here only.
  major, minor, _ = GPUS[target.chip_name]['cc']
  version = CUDNN_VERSION[0] * 10000 + CUDNN_VERSION[1] * 100 + CUDNN_VERSION[2]
  capability = lambda c: tuple(int(v) for v in c.split('.'))
  checks = dict(check_cudnn_version=lambda: version,
                check_compute_capability=lambda c: capability(c) <= (major, minor),
                is_cuda_compute_capability_equal=lambda c: capability(c) == (major, minor))
  with mock.patch.multiple(fused, **checks):  # Each restored on the way out.
    yield


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # As given, e.g. 'tpu:v5p:8x8x8'.
  platform: str  # 'tpu' or 'gpu'.
  chip_name: str  # e.g. 'v5p'.
  chip: Chip
  devices: tuple
  chips: int

  @property
  def devices_per_chip(self) -> int:
    return len(self.devices) // self.chips

  @property
  def local_devices(self) -> int:
    """Devices joined by the fast interconnect (ICI slice; one GPU host's NVLink)."""
    return GPUS_PER_HOST if self.platform == 'gpu' else len(self.devices)

  @property
  def device_hbm_bytes(self) -> float:
    return self.chip.hbm_gib * 1024 ** 3 / self.devices_per_chip


def parse(target: str) -> tuple[str, str, str]:
  """'tpu:v5p:8x8x8' -> ('tpu', 'v5p', '8x8x8'); ConfigError naming --target otherwise."""
  parts = target.split(':')
  if len(parts) != 3 or not all(parts):
    raise ConfigError(f'--target={target!r}: expected PLATFORM:CHIP:TOPOLOGY, e.g. tpu:v5p:8x8x8')
  platform, chip, topology = parts
  if f'{platform}:{chip}' not in CHIPS:
    raise ConfigError(f'--target={target!r}: unknown chip {platform}:{chip}; known: '
                      f'{", ".join(CHIPS)} (train/targets.py CHIPS)')
  return platform, chip, topology


def abstract_devices(target: str) -> Target:
  """The target's devices as libtpu (TPU) or the CUDA plugin (GPU) describes them: compile-only."""
  platform, chip, topology = parse(target)
  make = lambda devices, chips: Target(target, platform, chip, CHIPS[f'{platform}:{chip}'],
                                       devices, chips)
  if platform == 'gpu':
    devices = _gpu_devices(target, chip, topology)
    return make(devices, len(devices))
  # No machine-wide libtpu lock: several planners or tests may load it; none drives a real TPU.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    desc = topologies.get_topology_desc(platform='tpu', topology_name=f'{chip}:{topology}')
  except Exception as e:  # libtpu missing, or a topology name it rejects: one line, not a trace.
    raise ConfigError(f'--target={target!r}: libtpu cannot describe topology {chip}:{topology} '
                      f'({_first_line(e)}); install the extra with `pip install -e ".[tpu]"`') from None
  devices, dims = tuple(desc.devices), topology.split('x')
  chips = math.prod(int(x) for x in dims) if all(x.isdigit() for x in dims) else 0
  return make(devices, chips if chips >= 1 and len(devices) % chips == 0 else len(devices))


def _gpu_devices(target: str, chip: str, count: str) -> tuple:
  if not count.isdigit() or int(count) < 1:
    raise ConfigError(f'--target={target!r}: a GPU target is gpu:CHIP:COUNT, e.g. gpu:h100:512')
  n = int(count)
  if n > GPUS_PER_HOST and n % GPUS_PER_HOST:
    raise ConfigError(f'--target={target!r}: {n} GPUs are not whole hosts of {GPUS_PER_HOST}')
  hosts, per_host = (n // GPUS_PER_HOST, GPUS_PER_HOST) if n > GPUS_PER_HOST else (1, n)
  try:
    desc = topologies.get_topology_desc(platform='cuda', target_config=gpu_target_config(chip),
                                        topology=f'1x{hosts}x{per_host}')
  except Exception as e:  # No CUDA plugin, or it refuses the description: one line.
    raise ConfigError(f'--target={target!r}: the CUDA plugin cannot describe {n} {chip} GPUs '
                      f'({_first_line(e)}); install the extra with `pip install -e ".[gpu-plan]"` '
                      f'and run with JAX_PLATFORMS=cpu') from None
  return tuple(desc.devices)


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__
