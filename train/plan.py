"""python -m train.plan --config experiments/<name>.py [--json] [--mfu 0.4] [--wall-clock-days 42]
                       [--devices N] [--compile]

What a config costs and whether it fits, allocating nothing (after train/config.py validate):
  * parameters (total, active) and training FLOPs per token (model/flops.py);
  * per-device memory under the config's mesh (train/memory.py); with --compile also XLA's plan
    on emulated CPU devices at reduced depth, extrapolated (train/aot.py); with --target the
    real step compiled for an accelerator that is not attached: memory, FLOPs, collectives and
    a roofline; whether that fits `hardware.device_memory_gb` (or the target's HBM);
  * tokens/s, step time and time to train at a stated MFU, and the MFU a wall clock implies.
A config over the device memory is printed, then reported as an error (exit status 1).
"""

import json
import math
import sys

import jax
import ml_collections
from absl import app, flags

from model import count_params, training_flops_per_token
from model.config import ConfigError
from model.moe import grouped_matmul_kernel
from model.heads import ScalarModel
from train import aot, cli, targets
from train import generate as gen_lib
from train import config as config_lib
from train import context as context_lib
from train import memory as memory_lib
from train.memory import gib
from train.mesh import mesh_shape
from train.metrics import table_peak_tflops
from train.posttrain import config as pt_config
from train.posttrain import reward


def define_flags() -> None:
  """The CLI's flags, defined only by `python -m train.plan` (a library import claims none)."""
  global _JSON, _MFU, _DAYS, _DEVICES, _COMPILE, _DEPTHS, _TARGET
  _JSON = flags.DEFINE_bool('json', False, 'Print JSON instead of tables.')
  _MFU = flags.DEFINE_float('mfu', 0.4, 'Model FLOP utilisation assumed for tokens/s and time.')
  _DAYS = flags.DEFINE_float('wall_clock_days', 0.0, 'A wall clock for the whole run (days); '
                             'prints the MFU it implies. 0: none.')
  _DEVICES = flags.DEFINE_integer('devices', 0, 'Device count; needed only when a mesh axis is -1.')
  _COMPILE = flags.DEFINE_bool('compile', False, 'Also compile the train step on emulated CPU '
                               'devices and report XLA\'s per-device memory plan (minutes).')
  _TARGET = flags.DEFINE_string('target', '', 'Compile the real train step for an accelerator '
                                'topology that is not attached, e.g. tpu:v5p:8x8x8 (needs the '
                                '.[tpu] extra; train/targets.py) and report its compiler\'s plan.')
  _DEPTHS = flags.DEFINE_list('compile_depths', ['2', '3'], 'Layer units compiled; memory is '
                              'extrapolated linearly in depth from the first two.')


def plan(config, *, devices: int = 0, mfu: float = 0.4, wall_clock_days: float = 0.0) -> dict:
  """The tables' numbers as a flat dict, on `devices` (0: the product of config.mesh); ConfigError
  for a config that cannot run (validate); `check_fits` raises for one that does not fit."""
  if not devices and -1 in dict(config.mesh).values():
    raise ConfigError(f'mesh {dict(config.mesh)} has a -1 axis: give the device count with --devices')
  n = devices or math.prod(dict(config.mesh).values())
  rl = config if config.get('stage', None) in pt_config.RL_STAGES else None
  cfg, config, warnings = _validate(config, n)
  if not 0 < mfu <= 1:
    raise ConfigError(f'--mfu={mfu} must be in (0, 1]')
  sizes = mesh_shape(config.mesh, n)
  t = config.train
  seq = config.data.seq_len
  counts = count_params(cfg)
  flops = training_flops_per_token(cfg, seq)
  micro = t.global_batch // t.grad_accum
  tokens_per_step = t.global_batch * seq
  total_tokens = tokens_per_step * t.steps
  mem = memory_lib.estimate(config, sizes, cfg)
  p = {
      'warnings': warnings,
      **{f'params_{k}': getattr(counts, k) for k in ('total', 'active', 'embedding')},
      'seq_len': seq,
      'flops_per_token': flops.per_token,
      'flops_per_token_dense_equivalent': flops.dense_equivalent,
      'attention_flops_per_token': flops.attention_per_token,
      'config_name': config.hardware.name or '',
      'devices': n,
      'mesh': ' x '.join(f'{a}={s}' for a, s in sizes.items() if s > 1) or 'one device',
      'global_batch': t.global_batch,
      'grad_accum': t.grad_accum,
      'sequences_per_device_per_micro_batch':
          micro / context_lib.Placement.abstract(config, sizes).batch_shards,
      'tokens_per_step': tokens_per_step,
      'steps': t.steps,
      'warmup_steps': config.optim.warmup_steps,
      'total_tokens': total_tokens,
      'remat': cfg.remat,
      'attention': cfg.attention,
      'dispatch': cfg.dispatch if cfg.is_moe else '',
      **{f'mem_{k}_gib': gib(getattr(mem, k))
         for k in ('params', 'optimizer', 'grads', 'activations', 'transient')},
      'mem_transient_phase': mem.transient_phase,
      'mem_total_gib': gib(mem.total),
      'device_memory_gib': float(config.hardware.device_memory_gb),
      **(rl_section(rl, config, cfg, sizes, mem) if rl else {}),
  }
  hw, worst = config.hardware, p.get('rl_total_gib', mem.total / memory_lib.GIB)
  p['fits'] = None if hw.device_memory_gb <= 0 else bool(worst <= hw.device_memory_gb)
  # Per-device peak: hardware.peak_tflops, else the chip table's; 0: unknown.
  peak = float(hw.peak_tflops) if hw.peak_tflops > 0 else table_peak_tflops(hw.name)
  p.update(peak_tflops_per_device=peak, mfu=mfu)
  if peak > 0:
    cluster_flops = n * peak * 1e12
    p['tokens_per_sec'] = tokens_per_sec = mfu * cluster_flops / flops.per_token
    p['step_seconds'] = tokens_per_step / tokens_per_sec
    p['days_to_train'] = total_tokens / tokens_per_sec / 86400
    if wall_clock_days > 0:
      p['wall_clock_days'] = wall_clock_days
      p['mfu_implied_by_wall_clock'] = total_tokens * flops.per_token / (
          wall_clock_days * 86400 * cluster_flops)
  return p


POSTTRAIN_SECTIONS = ('stage', 'rm', 'ppo', 'grpo', 'dpo')


def _validate(config, n: int):
  """train/config.py validate (train/posttrain/config.py's, needing no checkpoint paths) as the
  run does it: (ModelConfig, config to plan, warnings). A data-source error is a warning and the
  default sources are planned (no data is read). RL is planned as its update step (a minibatch of
  rollouts of prompt + new tokens), RM and DPO as train.global_batch x data.seq_len."""
  warnings, stage = [], config.get('stage', None)
  if stage is not None:
    config = ml_collections.ConfigDict(config.to_dict())
    config.train.init_from = config.train.init_from or 'plan://unread'
    if not config.ppo.reward:  # A verifiable reward (PPO with ppo.reward) has no RM run.
      config.ppo.reward_model = config.ppo.reward_model or 'plan://unread'
  check = config_lib.validate if stage is None else pt_config.validate
  try:
    cfg = check(config, n)
  except ConfigError as e:
    if 'config.data.source' not in str(e):
      raise
    defaults = config_lib.defaults().data  # Plan the default sources (the embedded corpus).
    config = ml_collections.ConfigDict(config.to_dict())
    for key in [k for k in config.data.sources.keys() if k not in defaults.sources]:
      del config.data.sources[key]
    if config.data.source not in config.data.sources:
      config.data.source = 'embedded_sft' if 'sft' in str(config.data.source) else defaults.source
    cfg = check(config, n)
    warnings.append(f'data: {e} (the run would stop there; the planner reads no data and plans '
                    f'the rest)')
  if stage is None:
    return cfg, config, warnings
  planned = ml_collections.ConfigDict({k: v for k, v in config.to_dict().items()
                                      if k not in POSTTRAIN_SECTIONS})
  if stage in pt_config.RL_STAGES:
    p = config.ppo
    planned.train.update(global_batch=pt_config.rollouts_per_iteration(config) // p.num_minibatches,
                         steps=pt_config.ppo_updates(config))
    planned.data.seq_len = p.max_prompt_len + p.max_new_tokens
    warnings.append(f'stage {stage!r}: throughput and time count the policy updates only, not the '
                    f'rollouts or their scoring' + (' or the critic' if stage == 'ppo' else ''))
  elif stage != 'sft':
    warnings.append(f'stage {stage!r}: planned as the decoder update step; the reference and '
                    f'scalar models are not counted here')
  return cfg, planned, warnings


def rl_section(config, planned, cfg, sizes: dict, policy: memory_lib.Memory) -> dict:
  """An RL stage per device beside the policy's update step (`policy`: estimate of `planned`):
  the reference (the policy's params; host with ppo.ref_on_host), for PPO the reward model (none
  with ppo.reward; ppo.reward_ensemble's members sized as it) and the critic (ScalarModels of the
  ppo.reward_model run's model, else the policy's; the critic with AdamW, gradients, activations),
  the KV cache of ppo.rollout_slots (0: all rollouts) rounded up as train/generate.py does. Phases: rollout (the cache; a host
  reference after it), update."""
  p, notes, critic_work, rows = config.ppo, [], 0, {}
  rollouts = pt_config.rollouts_per_iteration(config)
  shards = context_lib.Placement.abstract(planned, sizes).batch_shards
  slots = math.lcm(gen_lib.bucket(p.rollout_slots or rollouts, 1), shards)
  kv_of = lambda n: memory_lib.kv_cache(planned, sizes, cfg, n, planned.data.seq_len)
  ref, kv = policy.params, kv_of(slots)
  on_device = policy.params + policy.optimizer + (0 if p.ref_on_host else ref)
  if config.stage == 'ppo':
    try:
      rm_cfg = reward.run_model_config(p.reward_model) if p.reward_model else None
    except (FileNotFoundError, ConfigError):
      rm_cfg = None
    notes = [] if rm_cfg or p.reward else [
        f'ppo.reward_model={p.reward_model!r} is not a run here: the reward model and critic are '
        f'sized with the policy\'s model config']
    rm = memory_lib.estimate(planned, sizes, rm_cfg or cfg, ScalarModel)
    critic = (rm if p.critic_init == 'reward_model' or rm_cfg is None
              else memory_lib.estimate(planned, sizes, cfg, ScalarModel))
    members = len(pt_config.reward_models(config))  # Each sized as the first.
    rm_params = 0 if p.reward else rm.params * members  # ppo.reward: a verifiable reward, no RM.
    on_device += rm_params + critic.params + critic.optimizer
    critic_work = critic.grads + critic.activations
    rows = {'rl_reward_model_gib': gib(rm_params),
            'rl_value_model_gib': gib(critic.params + critic.optimizer + critic_work)}
  rollout = on_device + max(kv, ref if p.ref_on_host else 0)
  update = on_device + policy.total - policy.params - policy.optimizer + critic_work
  limit = config.hardware.device_memory_gb * memory_lib.GIB
  most = max([n for n in (math.lcm(1 << k, shards) for k in range(40))
              if kv_of(shards) * n // shards <= limit - on_device], default=0)
  saves = {} if p.ref_on_host else {'ppo.ref_on_host=True': ref}
  if rollout > limit and 0 < most < slots:
    saves[f'ppo.rollout_slots={most}'] = kv - kv_of(most)
  knobs = [f'{k} (-{gib(v)} GiB)' for k, v in sorted(saves.items(), key=lambda x: -x[1])]
  knobs += [f'grpo.num_generations below {config.grpo.num_generations}'] * (config.stage == 'grpo')
  return {'rl_rollouts_per_iteration': rollouts, 'rl_rollout_slots': slots,
          'rl_policy_gib': gib(policy.params + policy.optimizer + policy.grads),
          'rl_policy_update_gib': gib(policy.activations + policy.transient + policy.batch),
          'rl_reference_gib': gib(0 if p.ref_on_host else ref),
          'rl_reference_host_gib': gib(ref if p.ref_on_host else 0), **rows,
          'rl_kv_cache_gib': gib(kv), 'rl_rollout_phase_gib': gib(rollout),
          'rl_update_phase_gib': gib(update), 'rl_total_gib': gib(max(rollout, update)),
          'rl_max_rollout_slots': most if limit > 0 else '', 'rl_notes': notes, 'rl_knobs': knobs}


def check_fits(p: dict) -> None:
  """ConfigError if the analytic per-device estimate (an RL stage's: rl_section) exceeds the
  device memory (the compiled CPU plan is of a variant, not the config's own)."""
  limit, worst = p['device_memory_gib'], p.get('rl_total_gib', p['mem_total_gib'])
  if not 0 < limit < worst:
    return
  knobs = _knobs(p['remat'], head=p['mem_transient_phase'] == 'head')
  what = (f'params {p["mem_params_gib"]}, optimizer {p["mem_optimizer_gib"]}, grads '
          f'{p["mem_grads_gib"]}, activations {p["mem_activations_gib"]} with model.remat='
          f'{p["remat"]!r}, peak working set {p["mem_transient_gib"]} in the '
          f'{p["mem_transient_phase"]} phase')
  if 'rl_total_gib' in p:  # An RL stage: its components, then the update step's.
    what = ', '.join(f'{k[3:-4].replace("_", " ")} {v}' for k, v in p.items() if k[:3] == 'rl_'
                     and k[-4:] == '_gib') + f' at {p["rl_rollout_slots"]} slots; update: ' + what
    knobs = p['rl_knobs'] + knobs
  raise ConfigError(f'hardware.device_memory_gb={limit:g}: the per-device memory estimate is '
                    f'{worst:.1f} GiB ({what}). Try: ' + '; '.join(knobs) + ' (docs/scale.md).')


def _knobs(remat: str, *, head: bool = False, grad_accum: int = 0, micro: int = 0,
           moe: bool = False) -> list[str]:
  """What lowers the per-device memory of a step, for the error messages."""
  fixes = ['model.remat=full'] if remat != 'full' else []
  if head:
    fixes.append('a smaller micro-batch per device for the logits (raise train.grad_accum) or '
                 'the vocabulary sharded over mesh.tensor')
  elif grad_accum:
    fixes.append(f'a smaller micro-batch per device (train.grad_accum={grad_accum} -> '
                 f'{2 * grad_accum}, micro-batch {micro} -> {micro // 2})')
  else:
    fixes.append('a smaller micro-batch per device (raise train.grad_accum)')
  fixes.append('more sharding (mesh.fsdp, mesh.tensor' + (', mesh.expert' if moe else '') + ')')
  return fixes


def compiled_section(config, devices: int, depths=(2, 3), run=None) -> dict:
  """XLA's per-device plan of the CPU variant (train/aot.py compile_variant) at two depths
  (layer units) extrapolated to the config's, next to the analytic estimate of that variant.
  `run(config, devices)` compiles (default: a child process)."""
  run = run or aot.compiled_memory_subprocess
  cfg = config_lib.model_config(config)
  per_unit = cfg.layers_per_unit
  d1, d2 = (int(d) for d in depths[:2])
  if not 0 < d1 < d2:
    raise ConfigError(f'--compile_depths={list(depths)}: need two increasing positive depths')
  _, config, _ = _validate(config, devices)  # The compiled step reads no data either.
  r1, r2 = (run(aot.compile_variant(config, d * per_unit), devices) for d in (d1, d2))
  total = _to_depth(r1.total_bytes, r2.total_bytes, d1, d2, cfg.num_units)
  variant = aot.compile_variant(config, cfg.num_layers)
  analytic = memory_lib.estimate(variant, mesh_shape(config.mesh, devices)).total
  return {
      'compiled_attention': variant.model.attention,
      'compiled_compute_dtype': variant.model.compute_dtype,
      'compiled_depths_layers': [d1 * per_unit, d2 * per_unit],
      'compiled_total_at_depths_gib': [gib(r.total_bytes) for r in (r1, r2)],
      'compiled_temp_at_depths_gib': [gib(r.temp_bytes) for r in (r1, r2)],
      'compiled_per_layer_gib': gib((r2.total_bytes - r1.total_bytes) / (d2 - d1) / per_unit),
      'compiled_total_gib': gib(total),
      'analytic_of_compiled_variant_gib': gib(analytic),
      'analytic_over_compiled': round(analytic / total, 3),
      'compile_seconds': round(r1.compile_seconds + r2.compile_seconds, 1),
  }


def _to_depth(v1: float, v2: float, d1: int, d2: int, units: int) -> float:
  """Linear in depth: v1 at d1 layer units, v2 at d2, extrapolated to `units`."""
  return v1 + (units - d1) * (v2 - v1) / (d2 - d1)


def _flops_variant(config, layers: int):
  """One micro-batch of `config` with `layers` layers unrolled (cost_analysis() counts a loop
  body once); the caller multiplies by train.grad_accum (the update counted that often)."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.num_layers = layers
  c.model.scan_layers = False
  c.train.global_batch = config.train.global_batch // config.train.grad_accum
  c.train.grad_accum = 1
  return c


def target_section(config, target, compile_fn=None) -> dict:
  """The config's real train step compiled for `target` (a name or a train/targets.py Target):
  memory per device against the chip's HBM, FLOPs and HBM bytes per step, the collectives and
  the roofline step time. ConfigError for a target or mesh that cannot work."""
  compile_fn = compile_fn or aot.compile_for_target
  target = targets.abstract_devices(target) if isinstance(target, str) else target
  n = len(target.devices)
  _, config, _ = _validate(config, n)  # Its warnings are plan()'s.
  cfg = config_lib.model_config(config)
  try:
    full = compile_fn(config, target)
  except aot.DoesNotFit as e:
    raise ConfigError(f'{e}. Try: ' + '; '.join(_target_fixes(config))
                      + ' (docs/scale.md)') from None
  seq = config.data.seq_len
  attention = aot.target_variant(config, target.platform)[0].model.attention
  tokens_per_device = config.train.global_batch * seq / n
  flops, head = training_flops_per_token(cfg, seq), 6 * cfg.d_model * cfg.vocab_size
  # Compiled / model FLOPs that remat alone explains: the layers' forward runs twice (4/3 of
  # their training FLOPs; at most that for partial policies), the output head's once.
  remat = (1.0 if cfg.remat == 'none'
           else ((flops.per_token - head) * 4 / 3 + head) / flops.per_token)
  model_flops = flops.per_token * tokens_per_device
  if full.flops is None:  # XLA:GPU has no cost model without a device: FLOPs from the model.
    xla_flops, hbm_bytes, kernel_flops = model_flops * remat, None, 0.0
    flops_source = 'model/flops.py x remat (the compiler gives no cost_analysis here)'
  else:
    r1, r2 = (compile_fn(_flops_variant(config, d * cfg.layers_per_unit), target) for d in (1, 2))
    grow = lambda a, b: config.train.grad_accum * _to_depth(a, b, 1, 2, cfg.num_units)
    xla_flops, hbm_bytes = grow(r1.flops, r2.flops), grow(r1.bytes_accessed, r2.bytes_accessed)
    # Splash's FLOPs (x 4/3 with remat), which cost_analysis() counts as zero; megablox gmm
    # declares its cost to XLA (tests/test_targets.py).
    kernel_flops = (flops.attention_per_token * (4 / 3 if cfg.remat != 'none' else 1.0)
                    * tokens_per_device if attention == 'splash' else 0.0)
    flops_source = ('cost_analysis of 1 and 2 unrolled layer units, extrapolated'
                    + (' + splash analytically' if kernel_flops else ''))
  chip, shares = target.chip, target.devices_per_chip  # Per-device figures: the chip's / shares.
  peak, hbm_bw = chip.peak_tflops * 1e12 / shares, chip.hbm_gbps * 1e9 / shares
  ici_bw = chip.ici_gbps * 1e9 / shares
  wide_bw = chip.wide_gbps * 1e9 / shares if chip.wide_gbps else ici_bw
  compiled_flops = compiled_for_time = xla_flops + kernel_flops
  notes = list(full.notes)
  if compiled_flops < model_flops:  # cost_analysis missed work: never a roofline above 100%.
    notes.append(f'compiled FLOPs ({compiled_flops / 1e12:.4g} TFLOP) are below the model\'s '
                 f'({model_flops / 1e12:.4g}): cost_analysis missed work; the roofline uses the '
                 f'model FLOPs x remat instead')
    compiled_for_time = model_flops * remat
  kinds = full.collectives.by_kind.values()
  wide = sum(c.moved_wide for c in kinds)
  times = {'compute': compiled_for_time / peak,
           'collectives': (sum(c.moved for c in kinds) - wide) / ici_bw + wide / wide_bw}
  if hbm_bytes is not None:
    times['hbm'] = hbm_bytes / hbm_bw
  step_s = max(times.values())
  mem = full.memory
  return {
      'target': target.name,
      'target_devices': n,
      'target_devices_per_chip': target.devices_per_chip,
      'target_notes': notes,
      'target_attention': attention,
      'target_grouped_matmul': (grouped_matmul_kernel(cfg.grouped_matmul, target.platform)
                                if cfg.is_moe and cfg.dispatch == 'dropless' else ''),
      'target_arguments_gib': gib(mem.argument_bytes),
      'target_temporaries_gib': gib(mem.temp_bytes),
      'target_total_gib': gib(mem.total_bytes),
      'target_hbm_gib': gib(target.device_hbm_bytes),
      'target_fits': bool(mem.total_bytes <= target.device_hbm_bytes),
      **{f'target_{k}_tflops_per_step': v / 1e12 for k, v in (
          ('compiled', compiled_flops), ('xla', xla_flops), ('kernel', kernel_flops),
          ('model', model_flops))},
      'target_compiled_over_model_flops': round(compiled_flops / model_flops, 3),
      'target_remat_explains': round(remat, 3),
      'target_flops_source': flops_source,
      'target_hbm_gb_per_step': round(hbm_bytes / 1e9, 2) if hbm_bytes is not None else '',
      'target_collectives': {k: {'count': c.count, 'gb': round(c.bytes / 1e9, 3),
                                 'gb_moved': round(c.moved / 1e9, 3)}
                             for k, c in full.collectives.by_kind.items()},
      'target_unknown_trip_counts': full.collectives.unknown_trip_counts,
      'target_compute_s': round(times['compute'], 4),
      'target_hbm_s': round(times['hbm'], 4) if 'hbm' in times else '',
      'target_collectives_s': round(times['collectives'], 4),
      'target_roofline_step_s': round(step_s, 4),
      'target_no_overlap_step_s': round(sum(times.values()), 4),
      'target_bound_by': max(times, key=times.get),
      'target_roofline_mfu': round(model_flops / (step_s * peak), 3),
      'target_days_to_train': round(config.train.steps * step_s / 86400, 2),
      'target_compile_s': round(full.memory.compile_seconds, 1),
  }


def _target_fixes(config) -> list[str]:
  cfg, t = config_lib.model_config(config), config.train
  return _knobs(cfg.remat, grad_accum=t.grad_accum, micro=t.global_batch // t.grad_accum,
                moe=cfg.is_moe)


def check_target_fits(p: dict, config) -> None:
  """ConfigError naming the knobs if the target compiler's plan exceeds the chip's HBM."""
  if 'target_fits' not in p or p['target_fits']:
    return
  raise ConfigError(
      f'{p["target"]}: the compiled train step needs {p["target_total_gib"]} GiB per device '
      f'(arguments {p["target_arguments_gib"]}, temporaries {p["target_temporaries_gib"]}), over '
      f'the {p["target_hbm_gib"]} GiB of HBM. Try: ' + '; '.join(_target_fixes(config))
      + ' (docs/scale.md).')


def _fmt(value) -> str:
  if isinstance(value, bool) or value is None:
    return {True: 'yes', False: 'NO', None: 'unknown (hardware.device_memory_gb=0)'}[value]
  if isinstance(value, int):
    return f'{value:,}'
  if isinstance(value, float):
    return f'{value:,.4g}' if abs(value) < 1e6 else f'{value:.4g}'
  if isinstance(value, list):
    return ', '.join(_fmt(v) for v in value)
  if isinstance(value, dict):
    return '; '.join(f'{k} {v["count"]:,} / {v["gb"]:g} / {v["gb_moved"]:g}'
                     for k, v in value.items() if v['count'])
  return str(value)


# The table: p's keys in order, a title before each section's first key; '' values left out.
TITLES = {
    'params_total': 'model',
    'config_name': 'run',
    'mem_params_gib': 'memory per device, analytic (GiB)',
    'peak_tflops_per_device': 'throughput',
    'target': 'compiled for the target by its own compiler, per device',
    'target_collectives': 'collectives per step (count, GB result, GB moved per device)',
    'target_compute_s': 'roofline (perfect overlap: step = max of the three; no overlap: their sum)',
    'compiled_attention': 'memory per device, XLA plan on emulated CPU devices (GiB)',
    'rl_rollouts_per_iteration': 'RL stage per device (GiB): the update step above and the rest',
}
NOT_IN_TABLE = ('warnings', 'target_notes', 'rl_notes', 'rl_knobs', 'target_unknown_trip_counts')


def format_table(p: dict) -> str:
  lines = [f'warning: {w}' for w in p.get('warnings', [])]
  lines += [f'note: {w}' for w in p.get('target_notes', []) + p.get('rl_notes', [])]
  width = max(len(k) for k in p if k not in NOT_IN_TABLE)
  for k, v in p.items():
    lines += [f'[{TITLES[k]}]'] if k in TITLES else []
    if k not in NOT_IN_TABLE and v != '':
      lines.append(f'  {k:<{width}}  {_fmt(v)}')
  return '\n'.join(lines)


def main(argv):
  try:
    config = cli.from_args(argv[1:])
    target, devices = None, _DEVICES.value
    if _TARGET.value:
      if _TARGET.value.startswith('gpu:'):  # GPUs are compile-only here: the host runs on CPU.
        jax.config.update('jax_platforms', 'cpu')
      target = targets.abstract_devices(_TARGET.value)
      devices = len(target.devices)
    p = plan(config, devices=devices, mfu=_MFU.value, wall_clock_days=_DAYS.value)
    if target is not None:
      p.update(target_section(config, target))
    if _COMPILE.value:
      p.update(compiled_section(config, p['devices'], _DEPTHS.value))
    sys.stdout.write((json.dumps(p, indent=2) if _JSON.value else format_table(p)) + '\n')
    if target is not None:
      check_target_fits(p, config)
    else:
      check_fits(p)
  except ConfigError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
