"""The data and the stage skeleton of the preference-pair stages (reward model, DPO).

Batches are {'chosen': rows, 'rejected': rows} of `data.pipeline.make_preference_iterator`, one pair
per row, each side the five fields of an LM batch ([B_local, T]); a stage may add per-pair fields
([B_local], e.g. DPO's pre-computed reference log-probs).
"""

import jax.numpy as jnp

from data import pipeline
from train import stage as stage_lib
from train.posttrain import config as pt_config

class Mapped:
  """An iterator of fn(batch) for `data`'s batches; state, counts and tokenizer are `data`'s."""

  def __init__(self, data, fn):
    self.data, self.fn = data, fn

  def __iter__(self):
    return self

  def __next__(self):
    return self.fn(next(self.data))

  def __getattr__(self, name):  # get_state, set_state, counts, tokenizer, build_stats.
    return getattr(self.data, name)


def both_sides(micro: dict) -> tuple[int, dict]:
  """(m, the m chosen rows then the m rejected rows [2m, T] of every field) of a micro-batch."""
  chosen, rejected = micro['chosen'], micro['rejected']
  return chosen['inputs'].shape[0], {k: jnp.concatenate([chosen[k], rejected[k]]) for k in chosen}


def stage(config, **kw) -> stage_lib.Stage:
  """A pair stage of `config` (its section config[name] has `eval_batches`)."""
  return stage_lib.Stage(
      validate=pt_config.validate,
      make_data=stage_lib.pipeline_data(pipeline.make_preference_iterator, config),
      eval_batches=int(config[kw['name']].eval_batches), step_options={'count_name': 'pairs'},
      step_tokens=2 * config.train.global_batch * config.data.seq_len, **kw)
