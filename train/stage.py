"""What a training stage supplies to the one loop (train/loop.py), and the language-model stage.

A stage is its model class, its data, its loss and its initial params; the loop does the rest
(sharded state, resume, the step of train/step.py, NaN policy, SIGTERM, checkpoints with the
gathered data state, eval, samples, profiler window, progress bar, TensorBoard and metrics).
Pre-training and SFT are `lm_stage`; the reward model and DPO are in train/posttrain/.
"""

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from data import pipeline
from model.transformer import Decoder
from train import checkpoint as ckpt_lib
from train import config as config_lib
from train import step as step_lib


def _keep(ctx, mdef, data, make_eval_data, steps_left):
  return None, data, make_eval_data


@dataclasses.dataclass
class Stage:
  """The parts of a run that differ between stages.

  validate(config, devices, processes) -> ModelConfig (raises ConfigError);
  make_data(ctx, split) -> iterator of process-local numpy batches [B_local, ...] (nested dicts
    allowed) with get_state() / set_state() and `.tokenizer`;
  make_loss(mdef, frozen) -> loss_fn(params, micro, rng) -> (loss_sum, (count, metric_sums));
  init_params(ctx, mdef, fresh_params) -> params of a fresh run (`fresh_params`: as initialised);
  prepare(ctx, mdef, data, make_eval_data, steps_left) -> (frozen, data, make_eval_data): once,
    after the restore (`data` is at the position of the next step): e.g. load a frozen reference
    (passed to make_loss in every step) or wrap the data;
  eval_metrics(means) -> extra eval scalars from the eval means ('eval/loss', ...).
  """
  name: str
  validate: Callable
  make_data: Callable
  make_loss: Callable
  init_params: Callable
  eval_batches: int
  model_cls: Any = Decoder
  prepare: Callable = _keep
  eval_metrics: Callable = lambda means: {}
  count_name: str = 'tokens'  # The metric of the step's count (tokens, pairs).
  rows_per_example: int = 1  # Sequences per batch row (pairs: 2), for throughput.
  shown: tuple = ()  # Metrics added to the log line.
  use_rng: bool = False  # A per-step RNG for the loss (MoE router noise).


def lm_stage(config) -> Stage:
  """Pre-training and SFT: next-token loss on data.pipeline batches; `train.init_from` (a
  checkpoints folder) gives the params of a fresh run."""
  init_from = config.train.init_from

  def make_data(ctx, split):
    return pipeline.make_iterator(
        config.data, vocab_size=ctx.cfg.vocab_size, global_batch=config.train.global_batch,
        workdir=ctx.workdir, split=split, process_index=jax.process_index(),
        process_count=jax.process_count(), seed=config.train.seed)

  def init_params(ctx, mdef, params):
    if not init_from:
      return params
    shardings = jax.tree.map(lambda x: x.sharding, params)
    return ckpt_lib.restore_params(init_from, params, shardings)

  cfg = config_lib.model_config(config)
  return Stage(name='lm', validate=config_lib.validate, make_data=make_data,
               make_loss=lambda mdef, frozen: step_lib.lm_loss(mdef), init_params=init_params,
               eval_batches=int(config.train.eval_batches),
               eval_metrics=lambda m: {'eval/perplexity': float(np.exp(min(m['eval/loss'], 50.0)))},
               use_rng=cfg.is_moe and cfg.router_jitter > 0)
