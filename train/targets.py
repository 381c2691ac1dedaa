"""Compile targets: accelerators that are not attached, as abstract devices, and their chip facts.

A target is written `PLATFORM:CHIP:TOPOLOGY`, e.g. `tpu:v5p:8x8x8` (512 v5p chips),
`tpu:v5e:16x16`, `tpu:v6e:8x8`, `tpu:v4:4x4x4`. `abstract_devices(target)` asks libtpu (the
optional extra `.[tpu]`) for the topology's devices: real XLA:TPU compiles for them from a
CPU-only host, nothing can run on them. train/aot.py compiles the train step for those devices
and train/plan.py prints the result against the chip's numbers below.

CHIPS holds one row per chip generation, from Google Cloud's published TPU specifications
(per chip: HBM capacity, peak bf16 dense TFLOP/s, HBM bandwidth, inter-chip interconnect
bandwidth as the spec sheet's Gbps figure / 8). GPU rows are NVIDIA's SXM data-sheet figures
(bf16 dense, HBM3/HBM2e bandwidth, NVLink bandwidth per GPU). A device may be a fraction of a
chip (TPU v4 exposes both TensorCores of a chip as devices): `devices_per_chip` comes from the
topology and every per-device figure is the chip's divided by it.
"""

import dataclasses
import math
import os

from model.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_gib: float
  peak_tflops: float  # bf16, dense.
  hbm_gbps: float  # GB/s.
  ici_gbps: float  # GB/s per chip for collectives (TPU: ICI; GPU: NVLink).


CHIPS = {
    'tpu:v4': Chip(hbm_gib=32, peak_tflops=275, hbm_gbps=1228, ici_gbps=300),
    'tpu:v5e': Chip(hbm_gib=16, peak_tflops=197, hbm_gbps=819, ici_gbps=200),
    'tpu:v5p': Chip(hbm_gib=95, peak_tflops=459, hbm_gbps=2765, ici_gbps=600),
    'tpu:v6e': Chip(hbm_gib=32, peak_tflops=918, hbm_gbps=1640, ici_gbps=448),
    'gpu:a100': Chip(hbm_gib=80, peak_tflops=312, hbm_gbps=2039, ici_gbps=300),
    'gpu:h100': Chip(hbm_gib=80, peak_tflops=989, hbm_gbps=3350, ici_gbps=450),
}


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # As given, e.g. 'tpu:v5p:8x8x8'.
  platform: str  # 'tpu' or 'gpu'.
  chip_name: str  # e.g. 'v5p'.
  topology: str  # e.g. '8x8x8', or a GPU count.
  chip: Chip
  devices: tuple
  chips: int

  @property
  def devices_per_chip(self) -> int:
    return len(self.devices) // self.chips

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
  """The target's devices as libtpu describes them (no TPU needed). GPU targets raise: this
  JAX cannot compile for a GPU that is not attached (docs/scale.md says why)."""
  platform, chip, topology = parse(target)
  if platform != 'tpu':
    raise ConfigError(
        f'--target={target!r}: ahead-of-time GPU compiles need an attached GPU with this JAX '
        f'(0.10.2 offers no deviceless CUDA topology; docs/scale.md, "GPU targets")')
  # libtpu takes a machine-wide lock file unless told that several processes may load it (a
  # planner next to a test run, or two planners): nothing here drives a real TPU.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    from jax.experimental import topologies  # Needs libtpu (.[tpu]) only for TPU targets.
    desc = topologies.get_topology_desc(platform='tpu', topology_name=f'{chip}:{topology}')
  except Exception as e:  # libtpu missing, or a topology name it rejects: one line, not a trace.
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f'--target={target!r}: libtpu cannot describe topology {chip}:{topology} '
                      f'({first}); install the extra with `pip install -e ".[tpu]"`') from None
  devices = tuple(desc.devices)
  try:
    chips = math.prod(int(x) for x in topology.split('x'))
  except ValueError:
    chips = len(devices)
  if chips < 1 or len(devices) % chips:
    chips = len(devices)
  return Target(name=target, platform=platform, chip_name=chip, topology=topology,
                chip=CHIPS[f'{platform}:{chip}'], devices=devices, chips=chips)
