"""python -m train.posttrain --config experiments/<stage>.py --workdir DIR [--config.key=value ...]

The stage is the config's `stage` ('rm', 'ppo', 'grpo', 'dpo'; none: SFT, the normal train loop,
e.g. experiments/tiny_sft.py). Every stage keeps the `train.init_from` run's tokenizer and writes
DIR/config.json, where train.generate, train.eval and the next stage find it.
"""

import jax
import ml_collections
from absl import app, flags

from model.config import ConfigError
from train import cli, distributed, loop
from train import workdir as workdir_lib
from train.posttrain import config as pt_config
from train.posttrain import dpo, ppo_loop, reward

flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and config.json go here.')
flags.mark_flags_as_required(['workdir'])


def run(config, workdir: str, *, stop_after: int | None = None):
  """Runs the stage `config` describes through the train loop; returns its RunResult."""
  stage = config.get('stage', 'sft')
  if stage not in pt_config.STAGES:
    raise ConfigError(f'stage={stage!r}: use one of {pt_config.STAGES}')
  if stage == 'sft':
    config = stage_config(config) if config.train.init_from else config
    return loop.run(config, workdir, stop_after=stop_after)
  distributed.maybe_initialize(config.distributed)  # Before anything asks JAX for devices.
  pt_config.validate(config, jax.device_count(), jax.process_count())  # Before reading init_from.
  config = stage_config(config)
  make_stage = {'rm': reward.stage, 'dpo': dpo.stage, 'ppo': ppo_loop.stage,
                'grpo': ppo_loop.stage}[stage]
  return loop.run(config, workdir, stage=make_stage(config), stop_after=stop_after)


def stage_config(config) -> ml_collections.ConfigDict:
  """A copy of `config` with data.tokenizer filled in from the init_from run."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.tokenizer = workdir_lib.inherited_tokenizer(config)
  return config


if __name__ == '__main__':
  app.run(lambda argv: cli.main(run, argv), flags_parser=cli.parse_flags)
