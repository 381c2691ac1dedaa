"""Config defaults (experiment files start from `defaults()`), experiment files and validation.

Every key a run reads is listed here: a typo in an experiment file or an override is an error naming
the key; configs that cannot work fail before compiling; `load_experiment`'s errors name file:line.
"""

import dataclasses
import difflib
import importlib.util
import os
import traceback

import ml_collections

from data import config as data_config
from model.config import ConfigError, ModelConfig
from model.sharding import spec_axes
from train.context import Placement
from train.mesh import mesh_shape


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = dataclasses.asdict(ModelConfig())
  c.mesh = dict(data=1, fsdp=-1, expert=1, tensor=1)
  c.sharding_rules = ml_collections.ConfigDict()  # Overrides of model/sharding.py RULES.
  c.data = data_config.default_config()
  c.optim = dict(peak_lr=3e-3, warmup_steps=100, final_lr_frac=0.1, b1=0.9, b2=0.95, eps=1e-8,
                 weight_decay=0.1, clip_norm=1.0)
  c.train = dict(
      steps=1000,  # Optimiser steps; the cosine schedule ends here.
      global_batch=8,  # Sequences per optimiser step, summed over accumulation steps and devices.
      grad_accum=1,  # Micro-batches per step: micro-batch = global_batch // grad_accum.
      seed=0,
      log_every=10,
      eval_every=0,  # 0: evaluate only at the end.
      eval_batches=4,
      ckpt_every=200,
      ckpt_keep=3,
      nan_policy='stop',  # 'stop': halt naming the step; 'skip': drop the update and count it.
      init_from='',  # A checkpoint directory whose params start this run (SFT, RLHF).
      progress=True,  # Progress bar on the terminal.
      profile_steps='',  # e.g. '10:13' writes a jax.profiler trace of those steps.
      sample_every=0,  # Every N steps: greedy continuations of fixed prompts, to TensorBoard and log; 0: off.
  )
  c.hardware = dict(
      name='',  # For the logs.
      peak_tflops=0.0,  # Per-device peak for MFU; 0: from the device table, or measured on CPU.
      device_memory_gb=0.0,  # Per-device memory the planner checks against (0: unknown).
  )
  c.distributed = dict(enabled=False, coordinator_address='', num_processes=0, process_id=-1,
                        peer_timeout_s=0.0)  # 0: MESHLM_PEER_TIMEOUT_S, else 10 (train/distributed.py).
  return c


# Sections whose keys are the user's own names (checked by their owners: data.config.validate).
FREE_FORM = ('data.sources', 'sharding_rules')


def check_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict | None = None,
               prefix: str = '') -> None:
  """Every key of `config` must exist in the defaults (free-form sections excepted)."""
  reference = defaults() if reference is None else reference
  for key in config.keys():
    name = f'{prefix}{key}'
    if name in FREE_FORM:
      continue
    if key not in reference:
      raise unknown_key(name, reference.keys())
    value, ref = config[key], reference[key]
    if isinstance(ref, ml_collections.ConfigDict) and len(ref) and isinstance(value, ml_collections.ConfigDict):
      check_keys(value, ref, f'{name}.')


def unknown_key(name: str, known) -> ConfigError:
  """The error of an unknown key `name` among `known`, with the closest known one."""
  close = difflib.get_close_matches(name.rsplit('.', 1)[-1], list(known), 1)
  hint = f'did you mean {close[0]!r}?' if close else f'known keys here: {", ".join(sorted(known))}'
  return ConfigError(f'unknown config key {name!r}; {hint}')


def load_experiment(spec: str) -> ml_collections.ConfigDict:
  """`get_config()` of the experiment file `spec` (`path:arg`: `get_config(arg)`)."""
  path, arg = spec, ()
  if not os.path.isfile(spec) and ':' in spec:
    path, arg = spec.rsplit(':', 1)[0], (spec.rsplit(':', 1)[1],)
  if not os.path.isfile(path):
    raise ConfigError(f'--config {spec}: no such experiment file')
  module_spec = importlib.util.spec_from_file_location('meshlm_experiment', path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, 'get_config', None)):
      raise ConfigError(f'{path}: the experiment file defines no get_config()')
    config = module.get_config(*arg)
  except SyntaxError as e:
    raise ConfigError(f'{e.filename}:{e.lineno}: {e.msg} (syntax error in the experiment file)') from e
  except ConfigError:
    raise
  except Exception as e:  # Whatever the file raises: say where, without the traceback.
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
             if os.path.abspath(f.filename) == os.path.abspath(path)]
    raise ConfigError(f'{path}:{lines[-1] if lines else 1}: loading the experiment raised '
                      f'{type(e).__name__}: {e}') from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'{path}: get_config() returned a {type(config).__name__}, not a ConfigDict')
  return config


def model_config(config) -> ModelConfig:
  return ModelConfig.from_dict(config.model.to_dict())


def validate(config, num_devices: int, process_count: int = 1) -> ModelConfig:
  """All static checks of a run; returns the ModelConfig. Runs before anything compiles."""
  check_keys(config)
  cfg = model_config(config)
  sizes = mesh_shape(config.mesh, num_devices)
  t, o = config.train, config.optim
  if t.grad_accum < 1 or t.global_batch % t.grad_accum:
    raise ConfigError(f'train.global_batch={t.global_batch} is not divisible by train.grad_accum={t.grad_accum}')
  micro = t.global_batch // t.grad_accum
  placement = Placement.abstract(config, sizes)  # train/context.py: the one builder of rules.
  for name, target in placement.rules.items():
    if unknown := set(spec_axes(target)) - set(sizes):
      raise ConfigError(f'sharding_rules.{name}={target!r}: {", ".join(sorted(unknown))} is not a '
                        f'mesh axis ({", ".join(sizes)})')
  axes, shards = spec_axes(placement.rules['batch']), placement.batch_shards
  if micro % shards:
    raise ConfigError(f'micro-batch train.global_batch / train.grad_accum = {micro} is not divisible by '
                      f'the {shards} batch shards (mesh axes {axes} of sizes {[sizes[a] for a in axes]})')
  if micro % process_count:
    raise ConfigError(f'micro-batch {micro} is not divisible by the {process_count} processes')
  if sizes['tensor'] > 1 and cfg.num_heads % sizes['tensor']:
    raise ConfigError(f'model.num_heads={cfg.num_heads} is not divisible by mesh.tensor={sizes["tensor"]}')
  if sizes['expert'] > 1 and (not cfg.is_moe or cfg.num_experts % sizes['expert']):
    raise ConfigError(f'mesh.expert={sizes["expert"]} must divide model.num_experts={cfg.num_experts}')
  if t.nan_policy not in ('stop', 'skip'):
    raise ConfigError(f"train.nan_policy={t.nan_policy!r}: use 'stop' or 'skip'")
  if config.optim.warmup_steps > t.steps:
    raise ConfigError(f'optim.warmup_steps={config.optim.warmup_steps} is longer than the whole run '
                      f'(train.steps={t.steps})')
  ranges = [('train', key, t[key] >= 1, 'positive')
            for key in ('steps', 'log_every', 'ckpt_every', 'ckpt_keep', 'eval_batches')]
  ranges += [('train', 'sample_every', t.sample_every >= 0, '>= 0 (0: no samples)'),
             ('optim', 'peak_lr', o.peak_lr > 0, '> 0'), ('optim', 'b1', 0 <= o.b1 < 1, 'in [0, 1)'),
             ('optim', 'b2', 0 <= o.b2 < 1, 'in [0, 1)'), ('optim', 'eps', o.eps > 0, '> 0'),
             ('optim', 'weight_decay', o.weight_decay >= 0, '>= 0'),
             ('optim', 'clip_norm', o.clip_norm >= 0, '>= 0 (0: no clipping)'),
             ('optim', 'warmup_steps', o.warmup_steps >= 0, '>= 0'),
             ('optim', 'final_lr_frac', 0 <= o.final_lr_frac <= 1, 'in [0, 1]')]
  for section, key, ok, what in ranges:
    if not ok:
      raise ConfigError(f'{section}.{key}={config[section][key]} must be {what}')
  if t.init_from and '://' not in t.init_from and not os.path.isdir(t.init_from):
    raise ConfigError(f'train.init_from={t.init_from}: no such directory (a run\'s workdir or '
                      f'checkpoints folder)')
  try:
    data_config.validate(config.data, vocab_size=cfg.vocab_size, global_batch=t.global_batch,
                         process_count=process_count)
  except data_config.DataConfigError as e:
    raise ConfigError(str(e)) from e
  return cfg
