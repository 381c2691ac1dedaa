"""Parameter counts of the published configs, from jax.eval_shape only (nothing allocated)."""

import importlib
import math
import pathlib
import resource

import pytest

from experiments import dense_65b
from model import count_params
from train.config import model_config, validate


def test_dense_65b_within_3_percent():
  rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  counts = count_params(model_config(dense_65b.get_config()))
  assert counts.total == 66_858_524_672
  assert abs(counts.total - 65e9) / 65e9 < 0.03
  assert counts.active == counts.total
  # 67B float32 parameters would be 267 GB; eval_shape must not have allocated them.
  grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
  assert grown_kib < 2 * 1024 * 1024


EXPERIMENTS = sorted(p.stem for p in pathlib.Path(__file__).resolve().parents[1].joinpath(
    'experiments').glob('*.py') if p.stem != '__init__')


@pytest.mark.parametrize('name', EXPERIMENTS)
def test_every_experiment_validates_for_its_mesh(name):
  """Each experiment file is a valid config for the device count its mesh names (nothing built)."""
  config = importlib.import_module(f'experiments.{name}').get_config()
  sizes = [s for s in config.mesh.values() if s != -1]
  num_devices = math.prod(sizes) * (8 if -1 in config.mesh.values() else 1)
  for name, source in config.data.sources.items():  # Paths the command line must give.
    if 'path' in source and not source.path:
      source.path = f'gs://bucket/{name}.jsonl'
  if 'stage' in config:  # Post-training stages carry their own sections (train/posttrain/config.py).
    from train.posttrain import config as posttrain_config
    config.train.init_from = config.train.init_from or 'gs://bucket/previous_stage'
    if config.stage == 'ppo':
      config.ppo.reward_model = config.ppo.reward_model or '/workdir/of/the/reward/model'
    cfg = posttrain_config.validate(config, num_devices)
  else:
    cfg = validate(config, num_devices)
  assert count_params(cfg).total > 0
