"""Throughput, model FLOP utilisation, and where metrics go (log, progress bar, TensorBoard).

MFU = model FLOP/s (model/flops.py) / the peak FLOP/s of all devices: `hardware.peak_tflops`, else
the chip table's by device kind; on CPU the matmul rate measured at start-up in the same process
(`measure_matmul_flops`), so CPU MFU says how close the step is to this machine's best XLA matmul.
"""

import contextlib
import functools
import json
import logging
import os
import sys
import time
import timeit

import jax
import jax.numpy as jnp
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from train.targets import CHIPS

log = logging.getLogger('meshlm')

# Device kinds as JAX names them -> their chip in train/targets.py CHIPS (H200: the H100's compute).
CHIP_OF_KIND = {'NVIDIA A100': 'gpu:a100', 'NVIDIA H100': 'gpu:h100', 'NVIDIA H200': 'gpu:h100',
                'TPU v4': 'tpu:v4', 'TPU v5 lite': 'tpu:v5e', 'TPU v5e': 'tpu:v5e',
                'TPU v5p': 'tpu:v5p', 'TPU v6 lite': 'tpu:v6e'}


def table_peak_tflops(name: str) -> float:
  """Dense bf16 peak TFLOP/s of the device kind `name` contains (the longest match); 0: none."""
  kind = max((k for k in CHIP_OF_KIND if k in name), key=len, default=None)
  return CHIPS[CHIP_OF_KIND[kind]].peak_tflops if kind else 0.0


@functools.lru_cache(maxsize=None)
def measure_matmul_flops(n: int = 1024, dtype=jnp.float32, repeats: int = 5, device=None) -> float:
  """Best-of-`repeats` FLOP/s of one n x n x n matmul on one device (all its cores).

  The operands are random normal: GPUs multiply constant data faster than real data.
  """
  device = device or jax.local_devices()[0]
  rng = np.random.default_rng(0)
  # Host arrays put on the one device, not jnp arrays: those would follow the run's mesh.
  a, b = (jax.device_put(rng.standard_normal((n, n)).astype(dtype), device) for _ in range(2))
  f = jax.jit(lambda a, b: a @ b)
  with jax.set_mesh(jax.sharding.Mesh(np.asarray([device]), ('one',))):  # Not the run's mesh.
    f(a, b).block_until_ready()
    best = min(timeit.repeat(lambda: f(a, b).block_until_ready(), repeat=repeats, number=1))
  return 2 * n ** 3 / best


def peak_flops(hardware_cfg) -> tuple[float, str]:
  """(peak FLOP/s of the whole mesh, where the number came from)."""
  devices = jax.devices()
  if hardware_cfg.peak_tflops > 0:
    return hardware_cfg.peak_tflops * 1e12 * len(devices), 'config hardware.peak_tflops'
  kind = devices[0].device_kind
  if table_peak_tflops(kind):
    return table_peak_tflops(kind) * 1e12 * len(devices), f'device table ({kind})'
  # CPU: emulated devices share the host's cores, so one all-core matmul is the whole peak.
  return measure_matmul_flops(), f'matmul rate measured now on {kind}'


class Throughput:
  """Tokens/s, step time and MFU over the steps since the last report."""

  def __init__(self, flops_per_token: float, peak: float):
    self.flops_per_token, self.peak = flops_per_token, peak
    self.reset()

  def reset(self):
    self.t0, self.tokens, self.steps, self.excluded = time.perf_counter(), 0.0, 0, 0.0

  def update(self, tokens: float):
    self.tokens, self.steps = self.tokens + tokens, self.steps + 1

  @contextlib.contextmanager
  def paused(self):
    """Time spent inside (evaluation, samples) does not count against training throughput."""
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self.excluded += time.perf_counter() - t0

  def report(self) -> dict:
    dt = max(time.perf_counter() - self.t0 - self.excluded, 1e-9)
    tps = self.tokens / dt
    out = {'perf/tokens_per_sec': tps, 'perf/step_time': dt / max(self.steps, 1),
           'perf/mfu': tps * self.flops_per_token / self.peak}
    self.reset()
    return out


class Writer:
  """Scalars to the log line and TensorBoard (tensorboardX; no TensorFlow), process 0 only."""

  def __init__(self, workdir: str, shown: tuple = ()):
    self.enabled = jax.process_index() == 0
    self.shown = SHOWN + tuple(shown)  # Keys on the log line (eval/* always).
    self.tb = self.jsonl = None
    self.history: list[dict] = []
    if self.enabled:
      self.tb = SummaryWriter(os.path.join(workdir, 'tb'))
      self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')

  def scalars(self, step: int, metrics: dict) -> dict:
    """Writes (and returns) `metrics` as floats."""
    metrics = {k: float(np.asarray(v)) for k, v in metrics.items()}
    self.history.append({'step': step, **metrics})
    if not self.enabled:
      return metrics
    for k, v in metrics.items():
      self.tb.add_scalar(k, v, step)
    self.jsonl.write(json.dumps({'step': step, **metrics}) + '\n')
    self.jsonl.flush()
    keys = [k for k in metrics if k in self.shown or k.startswith('eval')]
    short = [k.split('/')[-1] for k in keys]  # The full key where two short names would clash.
    shown = ' '.join(f'{s if short.count(s) == 1 else k}={_fmt(metrics[k])}'
                     for k, s in zip(keys, short))
    log.info('step %d: %s', step, shown)
    return metrics

  def text(self, step: int, tag: str, text: str):
    if self.enabled:
      self.tb.add_text(tag, text, step)

  def close(self):
    if self.tb is not None:
      self.tb.close()
      self.jsonl.close()


class Progress:
  """The terminal progress bar (tqdm): process 0 only, only when `stream` is a terminal, and
  off with `train.progress=False`. While it is shown, meshlm's log lines print above it."""

  def __init__(self, enabled: bool, total: int, initial: int = 0, stream=None):
    stream = sys.stderr if stream is None else stream
    shown = enabled and jax.process_index() == 0 and stream.isatty()
    self.bar = tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True, file=stream,
                    disable=not shown)
    self._redirect = (logging_redirect_tqdm([log], tqdm_class=tqdm) if shown
                      else contextlib.nullcontext())
    self._redirect.__enter__()

  def update(self, metrics: dict | None = None):
    """One step done; `metrics` (a log step's) puts the latest loss next to the bar."""
    if metrics and 'loss' in metrics:
      self.bar.set_postfix(loss=f'{float(metrics["loss"]):.4g}', refresh=False)
    self.bar.update(1)

  def close(self):
    self.bar.close()
    self._redirect.__exit__(None, None, None)


SHOWN = ('loss', 'learning_rate', 'grad_norm', 'perf/tokens_per_sec', 'perf/step_time', 'perf/mfu',
         'moe/aux_loss', 'moe/dropped_fraction')


def _fmt(v: float) -> str:
  return f'{v:.4g}' if abs(v) < 1e5 else f'{v:.3e}'
