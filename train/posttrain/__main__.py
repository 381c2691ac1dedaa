"""python -m train.posttrain --config experiments/<stage>.py --workdir DIR [--config.key=value ...]

The stage is the config's `stage` ('rm', 'ppo', 'dpo'); a config without one (a train/config.py
experiment, e.g. experiments/tiny_sft.py) is SFT: the normal train loop, run after filling in
`data.tokenizer` from the `train.init_from` run so that fine-tuning keeps the pre-trained
model's tokenizer. Every stage writes DIR/config.json.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment file with a get_config().',
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and config.json go here.')
flags.mark_flags_as_required(['config', 'workdir'])


def run(config, workdir: str):
  """Runs the stage `config` describes; returns its result object."""
  import ml_collections
  stage = config.get('stage', 'sft')
  if stage == 'sft':
    from train import generate as gen_lib
    from train import loop
    from train.posttrain import setup
    config = ml_collections.ConfigDict(config.to_dict())
    if config.train.init_from:
      config.data.tokenizer = setup.stage_tokenizer_path(config)
      # train/loop.py restores the latest step of a checkpoints folder: accept a workdir too.
      root, step, _ = gen_lib.resolve_checkpoint(config.train.init_from)
      if step is not None:
        from model.config import ConfigError
        raise ConfigError(f'train.init_from={config.train.init_from}: the train loop starts from '
                          f'the latest checkpoint of a run; pass its workdir')
      config.train.init_from = root
    gen_lib.write_config(config, workdir)
    return loop.run(config, workdir)
  if stage == 'rm':
    from train.posttrain import reward
    return reward.run(config, workdir)
  if stage == 'dpo':
    from train.posttrain import dpo
    return dpo.run(config, workdir)
  if stage == 'ppo':
    from train.posttrain import ppo_loop
    return ppo_loop.run(config, workdir)
  from model.config import ConfigError
  raise ConfigError(f'stage={stage!r}: use sft, rm, ppo or dpo')


def main(argv):
  del argv
  from model.config import ConfigError
  from train import compilation_cache, loop
  compilation_cache.enable()
  try:
    run(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, FileNotFoundError, loop.NonFiniteError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
