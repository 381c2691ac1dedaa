"""What a training stage supplies to the one loop (train/loop.py), and the language-model stage.

A stage is its model class, data, loss and initial params; the loop does the rest (sharded state,
resume, train/step.py's step, NaN policy, SIGTERM, checkpoints, eval, samples, profiling, metrics).
Pre-training and SFT are `lm_stage`; the reward model, DPO and PPO are in train/posttrain/.
"""

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from data import pipeline
from model.transformer import Decoder
from train import config as config_lib
from train import optimizer as optimizer_lib
from train import state as state_lib
from train import step as step_lib
from train import workdir as workdir_lib


@dataclasses.dataclass
class Stage:
  """The parts of a run that differ between stages; `ctx` is the run's train/context.py
  RunContext, `mdef` the ModelDef of state['params'], batches process-local numpy trees."""
  name: str
  validate: Callable  # (config, devices, processes) -> ModelConfig; raises ConfigError.
  # (ctx, split) -> iterator of batches [B_local, ...]: get/set_state(), counts(), .tokenizer.
  make_data: Callable
  make_loss: Callable  # (mdef, frozen) -> loss_fn(params, micro, rng), train/step.py's.
  init_state: Callable  # (ctx, mdef, state as initialised) -> the state of a fresh run.
  eval_batches: int
  step_tokens: int  # Tokens per step, for throughput.
  steps: int = 0  # Loop steps (optimiser updates; the schedule's length); 0: train.steps.
  model_cls: Any = Decoder
  # (ctx, mdef, data, make_eval_data, steps_left) -> (frozen, data, make_eval_data), once after
  # the restore (data at the next step's position): e.g. a frozen reference passed to make_loss.
  prepare: Callable = lambda ctx, mdef, data, make_eval, steps_left: (None, data, make_eval)
  eval_metrics: Callable = lambda means: {}  # Extra eval scalars from the means ('eval/loss').
  # train/step.py train_step's keywords (count_name: 'tokens', 'pairs'; use_rng: MoE router noise).
  step_options: dict = dataclasses.field(default_factory=dict)
  shown: tuple = ()  # Metrics added to the log line.
  # (ctx, steps) -> (state, shardings, mdef, tx, schedule) of a fresh run; None: {'step',
  # 'params', 'opt_state', 'rng'} of `model_cls` with train/optimizer.py's optimiser.
  make_state: Callable | None = None
  # (data, state, step) -> scalars, logged with every later step until replaced (PPO's rollout).
  before_step: Callable = lambda data, state, step: {}
  evaluate: Callable | None = None  # (data, params, frozen) -> eval scalars, not loss means.
  save_every: int = 1  # Checkpoints (and a stop request's) only at multiples of it.
  replicate_batch: bool = False  # Batches replicated over the mesh, not split over batch axes.

  def new_state(self, ctx, steps: int):
    """make_state's (state, shardings, mdef, tx, schedule), or the default one."""
    if self.make_state is not None:
      return self.make_state(ctx, steps)
    optim = ctx.config.optim
    tx, schedule = optimizer_lib.make(optim, steps), optimizer_lib.schedule(optim, steps)
    return (*state_lib.create(ctx.cfg, tx, ctx.mesh, ctx.config.train.seed, self.model_cls), tx,
            schedule)


def pipeline_data(make_iterator, config):
  """The make_data of a data.pipeline iterator (make_iterator, make_preference_iterator)."""
  return lambda ctx, split: make_iterator(
      config.data, vocab_size=ctx.cfg.vocab_size, global_batch=config.train.global_batch,
      workdir=ctx.workdir, split=split, process_index=jax.process_index(),
      process_count=jax.process_count(), seed=config.train.seed)


def lm_stage(config) -> Stage:
  """Pre-training and SFT: next-token loss on data.pipeline batches; `train.init_from` (any
  train/workdir.py checkpoint path) gives the params of a fresh run."""
  cfg, t = config_lib.model_config(config), config.train

  def init_state(ctx, mdef, state):
    if not t.init_from:
      return state
    return dict(state, params=workdir_lib.restore_params(t.init_from, ctx.cfg, ctx))

  return Stage(name='lm', validate=config_lib.validate,
               make_data=pipeline_data(pipeline.make_iterator, config), init_state=init_state,
               make_loss=lambda mdef, frozen: step_lib.lm_loss(mdef),
               eval_batches=int(t.eval_batches), step_tokens=t.global_batch * config.data.seq_len,
               eval_metrics=lambda m: {'eval/perplexity': float(np.exp(min(m['eval/loss'], 50.0)))},
               step_options={'use_rng': cfg.is_moe and cfg.router_jitter > 0})
