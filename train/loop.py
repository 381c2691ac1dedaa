"""The training loop: config -> mesh -> data -> sharded state -> (resume) -> steps -> checkpoints.

Importable from a notebook: `train.loop.run(config, workdir)` returns the final state and the
metric history. `python -m train` is a thin wrapper around it.

What a run leaves in `workdir`: checkpoints/, tokenizer/ (when it trained one), tb/ (TensorBoard
scalars of every metric, text samples every `train.sample_every` steps), metrics.jsonl (the
same scalars), curves.png (loss and throughput, train/plots.py), and profile/ when
`train.profile_steps` asks for a jax.profiler trace (train/profiling.py).
"""

import dataclasses
import logging
import os
import signal

import jax
import numpy as np
from jax.sharding import NamedSharding

from model import training_flops_per_token
from model.sharding import logical_to_spec, make_rules, use_rules
from train import checkpoint as ckpt_lib
from train import config as config_lib
from train import metrics as metrics_lib
from train import optimizer as optimizer_lib
from train import plots, profiling
from train import samples as samples_lib
from train import state as state_lib
from train import step as step_lib
from train.mesh import make_mesh

log = logging.getLogger('meshlm')


@dataclasses.dataclass
class RunResult:
  state: dict
  mdef: state_lib.ModelDef
  history: list
  tokenizer: object
  mesh: object


class NonFiniteError(FloatingPointError):
  pass


def run(config, workdir: str, *, stop_after: int | None = None) -> RunResult:
  """Trains (or resumes) the run in `workdir`. `stop_after=N` leaves after N steps of this
  call, with a checkpoint, as SIGTERM would (notebooks and the resume tests use it)."""
  setup_logging()
  from train import distributed
  distributed.maybe_initialize(config.distributed)
  cfg = config_lib.validate(config, jax.device_count(), jax.process_count())
  t = config.train
  trace = profiling.TraceWindow(t.profile_steps, os.path.join(workdir, 'profile'))
  mesh = make_mesh(config.mesh)
  if jax.process_index() == 0:  # What train.generate / train.eval read back.
    from train.generate import write_config
    write_config(config, workdir)
  rules = make_rules(config.sharding_rules.to_dict())
  log.info('mesh %s on %d %s devices, %d process(es)', dict(mesh.shape), jax.device_count(),
           jax.devices()[0].platform, jax.process_count())
  peak, peak_source = metrics_lib.peak_flops(config.hardware)  # Outside the mesh: one device.
  with jax.set_mesh(mesh), use_rules(rules):
    data = make_data(config, cfg, workdir, split='train')
    log.info('data sources as built: %s', data.build_stats)
    tx = optimizer_lib.make(config.optim, t.steps)
    schedule = optimizer_lib.schedule(config.optim, t.steps)
    state, shardings, mdef = state_lib.create(cfg, tx, mesh, t.seed)
    log.info('parameters: %s', f'{sum(x.size for x in jax.tree.leaves(state["params"])):,}')

    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=t.ckpt_keep)
    if checkpointer.latest_step() is not None:
      state, data_state = checkpointer.restore(state, shardings)
      data.set_state(distributed.local_data_state(data_state, jax.process_index(), jax.process_count()))
      log.info('resuming from step %d', int(state['step']))
    elif t.init_from:
      state['params'] = ckpt_lib.restore_params(t.init_from, state['params'], shardings['params'])
      log.info('params initialised from %s', t.init_from)

    batch_sharding = NamedSharding(mesh, logical_to_spec((None, 'batch', 'length'), rules=rules))
    train_step = step_lib.jit_train_step(mdef, tx, schedule, shardings, batch_sharding,
                                         use_router_noise=cfg.is_moe and cfg.router_jitter > 0)
    eval_step = step_lib.jit_eval_step(mdef, shardings['params'], batch_sharding)
    writer = metrics_lib.Writer(workdir)
    flops = training_flops_per_token(cfg, config.data.seq_len)
    log.info('model FLOPs/token %.3e (dense-equivalent %.3e); peak %.3e FLOP/s from %s',
             flops.per_token, flops.dense_equivalent, peak, peak_source)
    throughput = metrics_lib.Throughput(flops.per_token, peak)
    sampler = samples_lib.Sampler(cfg, data.tokenizer, mesh, rules) if t.sample_every else None
    start = int(state['step'])
    progress = metrics_lib.Progress(t.progress, t.steps, start)
    stop = StopSignal()

    try:
      pending = None  # (step, metrics) of the previous step, checked one step late (no sync).
      skipped = 0
      for step in range(start, t.steps):
        trace.maybe_start(step)
        with jax.profiler.StepTraceAnnotation('train', step_num=step):
          batch = device_batch(next(data), t.grad_accum, batch_sharding)
          state, metrics = train_step(state, batch)
        with throughput.paused():  # Writing the trace out is not training time.
          trace.maybe_stop(step, state)
        skipped += check_finite(pending, t.nan_policy)
        pending = (step, metrics)
        throughput.update(t.global_batch * config.data.seq_len)
        done, logged = step + 1, None
        if done % t.log_every == 0 or done == t.steps:
          skipped += check_finite(pending, t.nan_policy)
          pending = None
          logged = writer.scalars(done, {**metrics, **throughput.report(), 'skipped_steps': skipped,
                                         **data_counts(data)})
        if t.eval_every and done % t.eval_every == 0:
          with throughput.paused():
            writer.scalars(done, evaluate(config, cfg, workdir, state['params'], eval_step, batch_sharding))
        if t.sample_every and done % t.sample_every == 0:
          with throughput.paused():
            sampler.write(writer, done, state['params'])
        if stop_after is not None and done - start >= stop_after:
          stop.requested = True
        if done % t.ckpt_every == 0 or done == t.steps or stop.requested:
          checkpointer.save(done, state, distributed.gather_data_state(data.get_state()), force=True)
        progress.update(logged)
        if stop.requested:
          log.warning('stop requested: saved a checkpoint at step %d, exiting', done)
          break
      skipped += check_finite(pending, t.nan_policy)
      if not stop.requested and not t.eval_every:
        writer.scalars(int(state['step']),
                       evaluate(config, cfg, workdir, state['params'], eval_step, batch_sharding))
    finally:  # Also on errors: pending async checkpoint writes complete.
      trace.close()
      checkpointer.close()
      writer.close()
      stop.restore()
      progress.close()
  if writer.enabled:
    plots.write(workdir)
  return RunResult(state=state, mdef=mdef, history=writer.history, tokenizer=data.tokenizer, mesh=mesh)


def make_data(config, cfg, workdir, split):
  from data import pipeline
  return pipeline.make_iterator(config.data, vocab_size=cfg.vocab_size,
                                global_batch=config.train.global_batch, workdir=workdir, split=split,
                                process_index=jax.process_index(), process_count=jax.process_count(),
                                seed=config.train.seed)


def data_counts(data) -> dict:
  """Per source (this process): items and tokens read, items skipped by reason, as scalars."""
  return {f'data/{source}/{key}': value for source, counts in data.counts().items()
          for key, value in counts.items()}


def device_batch(local: dict, grad_accum: int, sharding) -> dict:
  """Process-local numpy [B_local, T] -> global jax arrays [accum, micro, T] on the mesh."""
  out = {}
  for name, x in local.items():
    x = np.asarray(x)
    x = x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])
    global_shape = (grad_accum, x.shape[1] * jax.process_count(), *x.shape[2:])
    out[name] = jax.make_array_from_process_local_data(sharding, x, global_shape)
  return out


def evaluate(config, cfg, workdir, params, eval_step, batch_sharding) -> dict:
  data = make_data(config, cfg, workdir, split='eval')
  nll, tokens = 0.0, 0.0
  for _ in range(config.train.eval_batches):
    batch = device_batch(next(data), 1, batch_sharding)
    out = eval_step(params, batch)
    nll, tokens = nll + float(out['nll_sum']), tokens + float(out['tokens'])
  loss = nll / max(tokens, 1.0)
  return {'eval/loss': loss, 'eval/perplexity': float(np.exp(min(loss, 50.0)))}


def check_finite(pending, policy: str) -> int:
  """1 if the pending step had a non-finite loss or gradient (its update was dropped)."""
  if pending is None:
    return 0
  step, metrics = pending
  if not float(metrics['nonfinite']):
    return 0
  message = (f'step {step}: non-finite loss or gradient (loss={float(metrics["loss"])}, '
             f'grad_norm={float(metrics["grad_norm"])}); the update was not applied')
  if policy == 'stop':
    raise NonFiniteError(message + '. Resume from the last checkpoint with a lower optim.peak_lr, '
                         'or set train.nan_policy=skip.')
  log.warning('%s; skipping (train.nan_policy=skip)', message)
  return 1


class StopSignal:
  """SIGTERM (and SIGINT) request a checkpoint and a clean exit after the current step."""

  def __init__(self):
    self.requested = False
    self._previous = {}
    try:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    except ValueError:  # Not the main thread (e.g. some notebook kernels): no handler.
      pass

  def _handle(self, signum, frame):
    self.requested = True

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def setup_logging():
  """meshlm's own handler: absl (used by the CLI) otherwise swallows INFO records."""
  logger = logging.getLogger('meshlm')
  if not logger.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter('%(asctime)s %(message)s', datefmt='%H:%M:%S'))
    logger.addHandler(handler)
    logger.propagate = False
  logger.setLevel(logging.INFO)
  for noisy in ('absl', 'orbax', 'jax._src'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
