"""Ahead-of-time compile of the train step, lowered with abstract inputs (ShapeDtypeStructs with
their shardings; nothing is allocated or run): the compiler's per-device plan for a compile target
(`compile_for_target`: TPU / GPU devices not attached, train/targets.py) or for emulated CPU
devices (`compiled_memory`; `python -m train.plan --compile` compiles `compile_variant`, in a
child process when the mesh exceeds this process's devices: emulated devices must exist first).
"""

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections

from model.sharding import use_rules
from train import config as config_lib
from train import context as context_lib
from train import hlo
from train import optimizer as optimizer_lib
from train import state as state_lib
from train import step as step_lib
from train import targets

COMPILER_OPTIONS = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
BATCH_KEYS = ('inputs', 'targets', 'positions', 'segment_ids', 'loss_mask')
# What each platform compiles for another platform's fused attention kernel.
PLATFORM_ATTENTION = {'tpu': {'cudnn': 'splash'}, 'gpu': {'splash': 'cudnn'},
                      'cpu': {'cudnn': 'xla', 'splash': 'xla', 'auto': 'xla'}}


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
  num_layers: int
  argument_bytes: int  # Per device: params, optimizer state, step, RNG, the batch shard.
  output_bytes: int
  alias_bytes: int  # Outputs written into donated arguments (the new state).
  temp_bytes: int  # XLA's peak scratch: activations, gathered weights, gradients, logits.
  compile_seconds: float

  @property
  def total_bytes(self) -> int:
    """Arguments + outputs that do not alias an argument + temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


@dataclasses.dataclass(frozen=True)
class TargetCompile:
  """What the target's own compiler planned for one train step, per device."""
  memory: CompiledMemory
  flops: float | None  # cost_analysis() per device (a loop body once); None: the compiler
  bytes_accessed: float | None  # gives none (XLA:GPU without a device).
  collectives: hlo.Collectives
  notes: tuple  # How the compiled config differs from the one given (target_variant).


class DoesNotFit(ValueError):
  """The target's compiler refused the program for lack of device memory."""


def compile_variant(config, num_layers: int):
  """A copy of `config` as compiled on CPU: attention cudnn/splash/auto -> xla, float32 compute,
  `num_layers` layers, every other per-device shape unchanged (why: docs/scale.md, section 1)."""
  c, _ = target_variant(config, 'cpu')
  c.model.num_layers = num_layers
  c.model.compute_dtype = 'float32'
  return c


def target_variant(config, platform: str):
  """(copy, notes): the config as compiled for `platform`, where a fused attention kernel of
  another platform becomes this platform's (dense_65b's `cudnn` on TPU: `splash`)."""
  c = copy.deepcopy(config)
  was = c.model.attention
  c.model.attention = PLATFORM_ATTENTION.get(platform, {}).get(was, was)
  if c.model.attention == was:
    return c, ()
  return c, (f'model.attention={was!r} is not a {platform} kernel: compiled with '
             f'{c.model.attention!r}',)


def lower_train_step(config, devices=None):
  """(lowered, validated ModelConfig): the train step of `config` lowered with abstract inputs
  for its mesh over `devices` (default: this process's; or a compile target's)."""
  ctx = context_lib.make(config, '', config_lib.validate, devices)
  t = config.train
  with jax.set_mesh(ctx.mesh), use_rules(ctx.rules):
    tx = optimizer_lib.make(config.optim, t.steps)
    state, shardings, mdef = state_lib.abstract(ctx.cfg, tx, ctx.mesh)
    batch_sharding = ctx.batch_sharding(3)
    shape = (t.grad_accum, t.global_batch // t.grad_accum, config.data.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == 'loss_mask' else jnp.int32,
                                     sharding=batch_sharding) for k in BATCH_KEYS}
    step = step_lib.jit_step(lambda _: step_lib.lm_loss(mdef), tx,
                             optimizer_lib.schedule(config.optim, t.steps), shardings,
                             batch_sharding, use_rng=ctx.cfg.is_moe and ctx.cfg.router_jitter > 0)
    return step.lower(state, batch, None), ctx.cfg


def _memory(compiled, num_layers: int, seconds: float) -> CompiledMemory:
  stats = compiled.memory_analysis()
  sizes = {f'{k}_bytes': int(getattr(stats, f'{k}_size_in_bytes'))
           for k in ('argument', 'output', 'alias', 'temp')}
  return CompiledMemory(num_layers=num_layers, compile_seconds=seconds, **sizes)


def compiled_memory(config, devices=None) -> CompiledMemory:
  """XLA's per-device memory plan of one train step of `config` (as given: call
  `compile_variant` first) over `devices` (default: all of this process's)."""
  t0 = time.perf_counter()
  lowered, cfg = lower_train_step(config, devices)
  compiled = lowered.compile(compiler_options=COMPILER_OPTIONS)
  return _memory(compiled, cfg.num_layers, time.perf_counter() - t0)


def compile_for_target(config, target) -> TargetCompile:
  """The config's real train step compiled for `target` (train/targets.py Target): XLA:TPU's
  (or XLA:GPU's) own plan and cost; DoesNotFit when it refuses for lack of HBM."""
  config, notes = target_variant(config, target.platform)
  t0 = time.perf_counter()
  with targets.compile_context(target):
    lowered, cfg = lower_train_step(config, list(target.devices))
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    used = re.search(r'Used ([\d.]+[KMGT]?i?B?) of ([\d.]+[KMGT]?i?B?) hbm', str(e))
    need, have = used.groups() if used else ('more than', '')
    raise DoesNotFit(f'{target.name}: XLA refuses the train step: it needs {need} of the {have} '
                     f'HBM per device') from None
  seconds = time.perf_counter() - t0
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  get = lambda key: float(cost[key]) if key in cost else None
  collectives = hlo.collectives(compiled.as_text(), len(target.devices), target.local_devices)
  return TargetCompile(memory=_memory(compiled, cfg.num_layers, seconds), flops=get('flops'),
                       bytes_accessed=get('bytes accessed'), collectives=collectives, notes=notes)


def compiled_memory_subprocess(config, num_devices: int, timeout: float = 1800) -> CompiledMemory:
  """`compiled_memory` in a child process with `num_devices` emulated CPU devices."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=repo,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}')
  proc = subprocess.run([sys.executable, '-m', 'train.aot'], input=config.to_json(), text=True,
                        capture_output=True, env=env, cwd=repo, timeout=timeout)
  if proc.returncode != 0:
    raise RuntimeError(f'train/aot.py: compiling on {num_devices} emulated CPU devices failed:\n'
                       f'{proc.stderr[-4000:]}')
  return CompiledMemory(**json.loads(proc.stdout.strip().splitlines()[-1]))


if __name__ == '__main__':  # The child: a config as JSON on stdin, the CompiledMemory on stdout.
  result = compiled_memory(ml_collections.ConfigDict(json.loads(sys.stdin.read())))
  sys.stdout.write(json.dumps(dataclasses.asdict(result)) + '\n')
