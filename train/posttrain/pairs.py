"""The data and the stage skeleton of the preference-pair stages (reward model, DPO).

Batches are {'chosen': rows, 'rejected': rows} of `data.pipeline.make_preference_iterator`,
one pair per row, each side the five fields of an LM batch ([B_local, T]); a stage may add
per-pair fields ([B_local], e.g. DPO's pre-computed reference log-probs). The loop
(train/loop.py) trains them like any other stage.
"""

import jax

from data import pipeline
from train import stage as stage_lib
from train.posttrain import config as pt_config

FIELDS = ('inputs', 'targets', 'positions', 'segment_ids', 'loss_mask')


class Mapped:
  """An iterator whose batches are fn(batch) of `data`'s; state, counts and tokenizer are
  `data`'s."""

  def __init__(self, data, fn):
    self.data, self.fn = data, fn

  def __iter__(self):
    return self

  def __next__(self):
    return self.fn(next(self.data))

  def __getattr__(self, name):  # get_state, set_state, counts, tokenizer, build_stats.
    return getattr(self.data, name)


def select(batch: dict) -> dict:
  """The model's fields of both sides of a batch of pairs."""
  return {side: {f: batch[side][f] for f in FIELDS} for side in ('chosen', 'rejected')}


def make_data(config):
  def make(ctx, split):
    data = pipeline.make_preference_iterator(
        config.data, vocab_size=ctx.cfg.vocab_size, global_batch=config.train.global_batch,
        workdir=ctx.workdir, split=split, process_index=jax.process_index(),
        process_count=jax.process_count(), seed=config.train.seed)
    return Mapped(data, select)
  return make


def stage(config, **kw) -> stage_lib.Stage:
  """A pair stage of `config` (its section config[name] has `eval_batches`)."""
  t = config.train
  return stage_lib.Stage(validate=pt_config.validate, make_data=make_data(config),
                         eval_batches=int(config[kw['name']].eval_batches),
                         step_options={'count_name': 'pairs'},
                         step_tokens=2 * t.global_batch * config.data.seq_len, **kw)
