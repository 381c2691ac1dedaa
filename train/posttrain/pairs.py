"""The training loop of the preference-pair stages (reward model, DPO).

Like train/loop.py (sharded state, accumulation, async checkpoints with the data position,
resume, TensorBoard/log metrics, eval at the end) but over batches of preference pairs
{'chosen': rows, 'rejected': rows} from `data.pipeline.make_preference_iterator`, with the loss
given by the stage (`PairStage`).
"""

import dataclasses
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from model.sharding import use_rules
from train import checkpoint as ckpt_lib
from train import generate as gen_lib
from train import metrics as metrics_lib
from train import optimizer as optimizer_lib
from train import state as state_lib
from train.posttrain import config as pt_config
from train.posttrain import setup

log = logging.getLogger('meshlm')
FIELDS = ('inputs', 'targets', 'positions', 'segment_ids', 'loss_mask')


@dataclasses.dataclass
class PairStage:
  """What a pair stage adds to the loop.

  loss_fn(params, micro, extra) -> (loss_sum, (pair_count, metric_sums)), `micro` holding
  'chosen' / 'rejected' dicts of [m, T] arrays (and any per-pair fields `prepare` adds);
  init_params(env, cfg, abstract_state) -> params of a fresh run;
  prepare(env, cfg, train_data, make_data, steps) -> (extra, per_step, per_eval): set-up done
  once (e.g. loading a reference model); `extra` is passed to every loss call; `per_step(k)` /
  `per_eval(k)` (or None) give extra numpy fields of training batch k of this run / eval batch k.
  """
  name: str
  model_cls: Any
  loss_fn: Callable
  init_params: Callable
  shown: tuple = ()  # Metrics added to the log line.
  prepare: Callable = lambda env, cfg, train_data, make_data, steps: (None, None, None)


@dataclasses.dataclass
class Result:
  state: dict
  history: list
  eval: dict
  tokenizer: object


def device_pairs(local: dict, grad_accum: int, env: setup.Env) -> dict:
  """Process-local numpy pairs [B, ...] -> global arrays [accum, B / accum, ...] on the mesh."""
  def put(x):
    x = np.asarray(x)
    x = x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])
    global_shape = (grad_accum, x.shape[1] * jax.process_count(), *x.shape[2:])
    return jax.make_array_from_process_local_data(env.batch_sharding(x.ndim, leading=1), x,
                                                  global_shape)
  return jax.tree.map(put, local)


def _select(batch: dict) -> dict:
  return {side: {f: batch[side][f] for f in FIELDS} for side in ('chosen', 'rejected')}


def train_step(state, batch, extra, *, loss_fn, tx, schedule):
  grads, sums, count = setup.accumulate(loss_fn, state['params'], batch, extra)
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  denom = jnp.maximum(count, 1.0)
  metrics = {k: v / denom for k, v in sums.items()}
  metrics.update(grad_norm=optax.tree.norm(grads), learning_rate=schedule(state['step']),
                 pairs=count)
  finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  return {'step': state['step'] + 1, 'params': keep(params, state['params']),
          'opt_state': keep(opt_state, state['opt_state']), 'rng': state['rng']}, metrics


def run(config: ml_collections.ConfigDict, workdir: str, stage: PairStage) -> Result:
  from data import pipeline
  from train.loop import setup_logging
  setup_logging()
  cfg = pt_config.validate(config, jax.device_count(), jax.process_count())
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.tokenizer = setup.stage_tokenizer_path(config)
  gen_lib.write_config(config, workdir)
  t = config.train
  env = setup.make_env(config)
  with jax.set_mesh(env.mesh), use_rules(env.rules):
    make_data = lambda split: pipeline.make_preference_iterator(
        config.data, vocab_size=cfg.vocab_size, global_batch=t.global_batch, workdir=workdir,
        split=split, process_index=jax.process_index(), process_count=jax.process_count(),
        seed=t.seed)
    data = make_data('train')
    tx = optimizer_lib.make(config.optim, t.steps)
    schedule = optimizer_lib.schedule(config.optim, t.steps)
    state, shardings, mdef = state_lib.create(cfg, tx, env.mesh, t.seed, stage.model_cls)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=t.ckpt_keep)
    if checkpointer.latest_step() is not None:
      state, data_state = checkpointer.restore(state, shardings)
      data.set_state(data_state)
      log.info('%s: resuming from step %d', stage.name, int(state['step']))
    else:
      state['params'] = stage.init_params(env, cfg, state)
      log.info('%s: initialised from %s', stage.name, t.init_from)
    start = int(state['step'])
    extra, per_step, per_eval = stage.prepare(env, cfg, data, make_data, t.steps - start)
    loss_fn = lambda p, micro, e: stage.loss_fn(p, micro, e, mdef=mdef)
    step_fn = jax.jit(lambda s, b, e: train_step(s, b, e, loss_fn=loss_fn, tx=tx,
                                                 schedule=schedule),
                      donate_argnums=0)
    writer = metrics_lib.Writer(workdir)
    try:
      for step in range(start, t.steps):
        local = _select(next(data))
        if per_step is not None:
          local.update(per_step(step - start))
        state, metrics = step_fn(state, device_pairs(local, t.grad_accum, env), extra)
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
          writer.scalars(done, metrics)
          log.info('%s step %d: %s', stage.name, done, setup.brief(metrics, stage.shown))
        if done % t.ckpt_every == 0 or done == t.steps:
          checkpointer.save(done, state, data.get_state(), force=True)
      eval_metrics = evaluate(config, stage, make_data('eval'), state['params'], extra, loss_fn,
                              env, per_eval)
      writer.scalars(int(state['step']), eval_metrics)
    finally:
      checkpointer.close()
      writer.close()
  return Result(state, writer.history, eval_metrics, data.tokenizer)


def evaluate(config, stage, data, params, extra, loss_fn, env, per_eval=None) -> dict:
  """Metric means over the stage's `eval_batches` held-out batches."""
  fn = jax.jit(lambda p, micro, e: loss_fn(p, jax.tree.map(lambda x: x[0], micro), e)[1])
  totals, count = {}, 0.0
  for k in range(config[stage.name].eval_batches):
    local = _select(next(data))
    if per_eval is not None:
      local.update(per_eval(k))
    n, sums = fn(params, device_pairs(local, 1, env), extra)
    count += float(n)
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  return {f'eval/{k}': v / max(count, 1.0) for k, v in totals.items()}
