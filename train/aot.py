"""Ahead-of-time compile of the train step: XLA's own memory plan, for a compile target
(`compile_for_target`: TPU topologies with no TPU attached, train/targets.py) or for emulated
CPU devices (`compiled_memory`, below).

`compile_for_target(config, target)` compiles the config as it is (full depth, its dtypes, its
attention kernel and MoE dispatch; only another platform's fused attention kernel is swapped
for the target's, `target_variant`) and reports memory_analysis(), cost_analysis() and the
collectives of the optimised HLO (train/hlo.py).

The CPU path:

`compiled_memory(config, devices)` lowers and compiles `train.step.train_step` for the config's
mesh with abstract inputs (ShapeDtypeStructs carrying their shardings): nothing is allocated
and nothing runs. `memory_analysis()` of an SPMD program describes one device, so its argument
+ temp bytes are the per-device footprint XLA planned (outputs alias the donated state).

What is compiled differs from the config in documented ways only (`compile_variant`), so that
the CPU plan is one the analytic model (train/memory.py) can be held to:
  * attention: `cudnn`, `splash` and `auto` become `xla`. The fused kernels exist only on GPU /
    TPU. `chunked` is not used as the stand-in because inside the layer `lax.scan` JAX 0.10.2
    keeps its custom-VJP forward's per-block residuals for every (query, key) block pair (all
    [t, t] scores; see docs/scale.md), which would mislead more than `xla`'s [b, n, t, t]
    scores that memory.py counts exactly;
  * compute dtype float32: XLA:CPU computes bfloat16 dots and most elementwise ops in float32
    and plans float32 buffers for them, which a GPU plan would not have;
  * depth: `num_layers` is replaced by a few layer units; per-device shapes of everything else
    (widths, mesh, micro-batch per device, sequence, the scan over layers) are unchanged.
The analytic estimate of the same variant is computed next to it (train/plan.py), and the
difference between the variant and the real config is then purely analytic: the dtype of the
activations and the attention term.

`python -m train.plan --compile` compiles two depths and extrapolates linearly to the config's
depth (see train/plan.py). Emulated devices must exist before JAX starts, so a mesh larger than
this process's device count is compiled in a child process (`compiled_memory_subprocess`).
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
from jax.sharding import NamedSharding

from model.sharding import logical_to_spec, make_rules, use_rules
from train import config as config_lib
from train import hlo
from train import optimizer as optimizer_lib
from train import state as state_lib
from train import step as step_lib
from train import targets
from train.mesh import make_mesh

CPU_STAND_IN = {'cudnn': 'xla', 'splash': 'xla', 'auto': 'xla'}
COMPILER_OPTIONS = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
BATCH_KEYS = ('inputs', 'targets', 'positions', 'segment_ids', 'loss_mask')


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


def compile_variant(config, num_layers: int):
  """The config as compiled on CPU (see the module docstring); a copy, the input is unchanged."""
  c = copy.deepcopy(config)
  c.model.num_layers = num_layers
  c.model.compute_dtype = 'float32'
  c.model.attention = CPU_STAND_IN.get(c.model.attention, c.model.attention)
  return c


def lower_train_step(config, devices=None):
  """`train.step.train_step` of `config` lowered for its mesh over `devices` (default: all of
  this process's; or the abstract devices of a compile target), with abstract inputs:
  ShapeDtypeStructs carrying their shardings. Nothing executes and nothing is allocated, so
  the devices need not be attached. Returns (lowered, validated ModelConfig)."""
  devices = jax.devices() if devices is None else devices
  cfg = config_lib.validate(config, len(devices))
  mesh = make_mesh(config.mesh, devices)
  rules = make_rules(config.sharding_rules.to_dict())
  t = config.train
  with jax.set_mesh(mesh), use_rules(rules):
    tx = optimizer_lib.make(config.optim, t.steps)
    schedule = optimizer_lib.schedule(config.optim, t.steps)
    mdef, _ = state_lib.model_def(cfg)

    def init(seed):
      key = jax.random.PRNGKey(seed)
      params = state_lib.init_params(cfg, key)
      return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
              'rng': key}

    abstract = jax.eval_shape(init, 0)
    shardings = state_lib.state_shardings(mdef, abstract, tx, mesh)
    state = state_lib.abstract_state(shardings, abstract)
    batch_sharding = NamedSharding(mesh, logical_to_spec((None, 'batch', 'length'), rules=rules))
    shape = (t.grad_accum, t.global_batch // t.grad_accum, config.data.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == 'loss_mask' else jnp.int32,
                                     sharding=batch_sharding) for k in BATCH_KEYS}
    step = step_lib.jit_step(lambda _: step_lib.lm_loss(mdef), tx, schedule, shardings, batch_sharding,
                             use_rng=cfg.is_moe and cfg.router_jitter > 0)
    return step.lower(state, batch, None), cfg


def _memory(stats, num_layers: int, seconds: float) -> CompiledMemory:
  return CompiledMemory(num_layers=num_layers, argument_bytes=int(stats.argument_size_in_bytes),
                        output_bytes=int(stats.output_size_in_bytes),
                        alias_bytes=int(stats.alias_size_in_bytes),
                        temp_bytes=int(stats.temp_size_in_bytes), compile_seconds=seconds)


def compiled_memory(config, devices=None) -> CompiledMemory:
  """Compiles one train step of `config` (as given: call `compile_variant` first) for its mesh
  over `devices` (default: all of this process's) and returns XLA's per-device memory plan."""
  t0 = time.perf_counter()
  lowered, cfg = lower_train_step(config, devices)
  stats = lowered.compile(compiler_options=COMPILER_OPTIONS).memory_analysis()
  return _memory(stats, cfg.num_layers, time.perf_counter() - t0)


@dataclasses.dataclass(frozen=True)
class TargetCompile:
  """What the target's own compiler planned for one train step, per device."""
  memory: CompiledMemory
  flops: float | None  # cost_analysis(): FLOPs per device (a loop body counted once); None
  bytes_accessed: float | None  # when the compiler gives none (XLA:GPU without a device).
  collectives: hlo.Collectives
  notes: tuple  # How the compiled config differs from the one given (target_variant).


class DoesNotFit(ValueError):
  """The target's compiler refused the program for lack of device memory."""


# The fused attention kernel of each platform, for configs written for another one.
PLATFORM_ATTENTION = {'tpu': {'cudnn': 'splash'}, 'gpu': {'splash': 'cudnn'}}


def target_variant(config, platform: str):
  """The config as compiled for `platform`: unchanged, except that a fused attention kernel of
  another platform becomes this platform's (dense_65b names `cudnn`, its A100 kernel; on a TPU
  target that is `splash`). Returns (copy, notes)."""
  c = copy.deepcopy(config)
  was = c.model.attention
  now = PLATFORM_ATTENTION.get(platform, {}).get(was, was)
  notes = []
  if now != was:
    c.model.attention = now
    notes.append(f'model.attention={was!r} is not a {platform} kernel: compiled with {now!r}')
  return c, tuple(notes)


def compile_for_target(config, target) -> TargetCompile:
  """Compiles the config's real train step (full depth, its dtypes, attention and dispatch)
  for `target` (train/targets.py Target): XLA:TPU's (or XLA:GPU's) own plan and cost."""
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
    raise DoesNotFit(f'{target.name}: XLA refuses the train step: it needs '
                     f'{used.group(1) if used else "more than"} of the {used.group(2) if used else ""} '
                     f'HBM per device') from None
  seconds = time.perf_counter() - t0
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return TargetCompile(memory=_memory(compiled.memory_analysis(), cfg.num_layers, seconds),
                       flops=float(cost['flops']) if 'flops' in cost else None,
                       bytes_accessed=(float(cost['bytes accessed']) if 'bytes accessed' in cost
                                       else None),
                       collectives=hlo.collectives(compiled.as_text(), len(target.devices),
                                                   target.local_devices),
                       notes=notes)


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


def _main():
  """Child-process entry: a config as JSON on stdin, the CompiledMemory as JSON on stdout."""
  import ml_collections
  config = ml_collections.ConfigDict(json.loads(sys.stdin.read()))
  result = compiled_memory(config)
  sys.stdout.write(json.dumps(dataclasses.asdict(result)) + '\n')


if __name__ == '__main__':
  _main()
