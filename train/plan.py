"""python -m train.plan --config experiments/<name>.py [--json]

What a config costs, computed without allocating a single parameter (`jax.eval_shape`).
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from model import count_params, training_flops_per_token
from train.config import check_keys, model_config

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment file.', lock_config=True)
_JSON = flags.DEFINE_bool('json', False, 'Print JSON instead of a table.')
flags.mark_flag_as_required('config')


def plan(config) -> dict:
  check_keys(config)
  cfg = model_config(config)
  counts = count_params(cfg)
  flops = training_flops_per_token(cfg, config.data.seq_len)
  return {
      'params_total': counts.total,
      'params_active': counts.active,
      'params_embedding': counts.embedding,
      'seq_len': config.data.seq_len,
      'flops_per_token': flops.per_token,
      'flops_per_token_dense_equivalent': flops.dense_equivalent,
      'attention_flops_per_token': flops.attention_per_token,
      'tokens_per_step': config.train.global_batch * config.data.seq_len,
      'steps': config.train.steps,
  }


def format_table(p: dict) -> str:
  rows = [(k, f'{v:,}' if isinstance(v, int) else f'{v:.4g}') for k, v in p.items()]
  width = max(len(k) for k, _ in rows)
  return '\n'.join(f'{k:<{width}}  {v:>24}' for k, v in rows)


def main(argv):
  del argv
  p = plan(_CONFIG.value)
  sys.stdout.write((json.dumps(p, indent=2) if _JSON.value else format_table(p)) + '\n')


if __name__ == '__main__':
  app.run(main)
