"""The training loop of every stage: config -> run context -> data -> sharded state -> (resume)
-> steps -> checkpoints. `run(config, workdir)` (also from a notebook; `python -m train` and
`python -m train.posttrain` wrap it) returns the final state and the metric history.

A stage (train/stage.py) supplies model, data, loss and initial params; every stage keeps the
same promises: resume is bit-identical, SIGTERM saves a checkpoint and exits cleanly,
`train.nan_policy` stops naming the step or counts the skipped update, and the data state of
every process travels in the checkpoint. `workdir` gets config.json, checkpoints/, tokenizer/
(when it trained one), tb/ (TensorBoard scalars; text samples every `train.sample_every` steps),
metrics.jsonl, curves.png (train/plots.py) and profile/ (`train.profile_steps`).
"""

import dataclasses
import functools
import logging
import os
import signal

import jax

from model import training_flops_per_token
from model.sharding import use_rules
from model.transformer import Decoder
from train import checkpoint as ckpt_lib
from train import context as context_lib
from train import distributed
from train import metrics as metrics_lib
from train import plots, profiling
from train import samples as samples_lib
from train import stage as stage_lib
from train import state as state_lib
from train import step as step_lib
from train import workdir as workdir_lib

log = logging.getLogger('meshlm')


@dataclasses.dataclass
class RunResult:
  state: dict
  mdef: state_lib.ModelDef
  history: list
  tokenizer: object
  mesh: object
  eval: dict  # The last evaluation's metrics ({} if none ran).


class NonFiniteError(FloatingPointError):
  pass


def run(config, workdir: str, *, stage: stage_lib.Stage | None = None,
        stop_after: int | None = None) -> RunResult:
  """Trains (or resumes) the run in `workdir`; `stage` defaults to the LM stage of `config`.
  `stop_after=N` leaves after N steps of this call, with a checkpoint, as SIGTERM would. SIGTERM is
  handled from the start: before the first step it ends the run, nothing trained or saved."""
  setup_logging()
  stop = StopSignal()
  try:
    return _run(config, workdir, stage, stop_after, stop)
  finally:
    stop.restore()


def _run(config, workdir, stage, stop_after, stop) -> RunResult:
  distributed.maybe_initialize(config.distributed)
  stage = stage_lib.lm_stage(config) if stage is None else stage
  ctx = context_lib.make(config, workdir, stage.validate)
  cfg, t, steps = ctx.cfg, config.train, stage.steps or config.train.steps
  trace = profiling.TraceWindow(t.profile_steps, os.path.join(workdir, 'profile'))
  if jax.process_index() == 0:  # What train.generate / train.eval / the next stage read back.
    workdir_lib.write_config(config, workdir)
  log.info('%s: mesh %s on %d %s devices, %d process(es)', stage.name, dict(ctx.mesh.shape),
           jax.device_count(), jax.devices()[0].platform, jax.process_count())
  peak, peak_source = metrics_lib.peak_flops(config.hardware)  # Outside the mesh: one device.
  with jax.set_mesh(ctx.mesh), use_rules(ctx.rules):
    data = stage.make_data(ctx, 'train')
    log.info('data sources as built: %s', getattr(data, 'build_stats', {}))
    state, shardings, mdef, tx, schedule = stage.new_state(ctx, steps)
    log.info('parameters: %s', f'{sum(x.size for x in jax.tree.leaves(state["params"])):,}')

    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=t.ckpt_keep)
    if checkpointer.latest_step() is not None:
      state, data_state = checkpointer.restore(state, shardings)
      data.set_state(distributed.local_data_state(data_state, jax.process_index(),
                                                  jax.process_count()))
      log.info('%s: resuming from step %d', stage.name, int(state['step']))
    else:
      state = stage.init_state(ctx, mdef, state)
      if t.init_from:
        log.info('%s: params initialised from %s', stage.name, t.init_from)
    start = int(state['step'])
    frozen, data, make_eval_data = stage.prepare(ctx, mdef, data,
                                                 lambda: stage.make_data(ctx, 'eval'),
                                                 steps - start)

    make_loss = lambda f: stage.make_loss(mdef, f)
    train_step = step_lib.jit_step(make_loss, tx, schedule, shardings, **stage.step_options)
    batch_sharding = (lambda ndim: ctx.replicated) if stage.replicate_batch else ctx.batch_sharding
    evaluate = (functools.partial(stage.evaluate, data) if stage.evaluate else
                evaluator(make_loss, make_eval_data, stage, ctx))
    writer = metrics_lib.Writer(workdir, shown=stage.shown)
    flops = training_flops_per_token(cfg, config.data.seq_len)
    log.info('model FLOPs/token %.3e (dense-equivalent %.3e); peak %.3e FLOP/s from %s',
             flops.per_token, flops.dense_equivalent, peak, peak_source)
    throughput = metrics_lib.Throughput(flops.per_token, peak)
    sampler = (samples_lib.Sampler(cfg, data.tokenizer, ctx.mesh, ctx.rules)
               if t.sample_every and stage.model_cls is Decoder else None)
    progress = metrics_lib.Progress(t.progress, steps, start)
    eval_metrics, source_metrics = {}, {}

    try:
      pending, skipped = None, 0  # pending: the previous (step, metrics), checked one step late.
      if stop.requested:  # During start-up: nothing trained yet.
        saved = f'the latest checkpoint is still step {start}' if start else 'nothing saved'
        log.warning('stop requested before the first step: nothing trained, %s; exiting', saved)
      for step in range(start, start if stop.requested else steps):
        done = step + 1  # The step's number everywhere: metrics, log, progress, errors.
        trace.maybe_start(step)
        with jax.profiler.StepTraceAnnotation('train', step_num=step):
          source_metrics.update(stage.before_step(data, state, step))
          batch = step_lib.device_batch(next(data), t.grad_accum, batch_sharding)
          state, metrics = train_step(state, batch, frozen)
        with throughput.paused():  # Writing the trace out is not training time.
          trace.maybe_stop(step, state)
        skipped += check_finite(pending, t.nan_policy, writer)
        pending = (done, metrics)
        throughput.update(stage.step_tokens)
        logged = None
        if done % t.log_every == 0 or done == steps:
          skipped += check_finite(pending, t.nan_policy, writer)
          pending = None
          counts = {f'data/{src}/{key}': n for src, by_key in data.counts().items()
                    for key, n in by_key.items()}  # Per source: items, tokens, skips by reason.
          logged = writer.scalars(done, {**metrics, **source_metrics, **throughput.report(),
                                         'skipped_steps': skipped, **counts})
        if t.eval_every and done % t.eval_every == 0:
          with throughput.paused():
            eval_metrics = writer.scalars(done, evaluate(state['params'], frozen))
        if sampler is not None and done % t.sample_every == 0:
          with throughput.paused():
            sampler.write(writer, done, state['params'])
        if stop_after is not None and done - start >= stop_after:
          stop.requested = True
        may_save = done % stage.save_every == 0
        if may_save and (done % t.ckpt_every == 0 or done == steps or stop.requested):
          checkpointer.save(done, state, distributed.gather_data_state(data.get_state()), force=True)
        progress.update(logged)
        if stop.requested and may_save:
          log.warning('stop requested: saved a checkpoint at step %d, exiting', done)
          break
      skipped += check_finite(pending, t.nan_policy, writer)
      if not stop.requested and not t.eval_every:
        eval_metrics = writer.scalars(int(state['step']), evaluate(state['params'], frozen))
    finally:  # Also on errors: the trace, checkpointer, writer and progress bar are closed.
      trace.close()
      checkpointer.close()
      writer.close()
      progress.close()
  if writer.enabled:
    plots.write(workdir)
  return RunResult(state=state, mdef=mdef, history=writer.history, tokenizer=data.tokenizer,
                   mesh=ctx.mesh, eval=eval_metrics)


def evaluator(make_loss, make_eval_data, stage, ctx):
  """(params, frozen) -> 'eval/<name>' means of make_loss(frozen) over the stage's `eval_batches`
  batches of a fresh eval iterator (the same each time), and 'eval/count' (items: tokens, pairs)."""
  eval_fn = jax.jit(lambda params, batch, frozen: make_loss(frozen)(params, batch, None)[1])

  def evaluate(params, frozen) -> dict:
    data, totals, count = make_eval_data(), {}, 0.0
    for _ in range(stage.eval_batches):
      batch = step_lib.device_batch(next(data), 1, ctx.batch_sharding)
      n, sums = eval_fn(params, jax.tree.map(lambda x: x[0], batch), frozen)
      count += float(n)
      for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    means = {f'eval/{k}': v / max(count, 1.0) for k, v in totals.items()}
    return {**means, **stage.eval_metrics(means), 'eval/count': count}
  return evaluate


def check_finite(pending, policy: str, writer) -> int:
  """1 if the pending (step, metrics) had a non-finite loss or gradient (update dropped; `step`
  1-based, as logged), else 0. Policy 'stop': its metrics written, then NonFiniteError names it."""
  if pending is None:
    return 0
  step, metrics = pending
  if not float(metrics['nonfinite']):
    return 0
  message = (f'step {step}: non-finite loss or gradient (loss={float(metrics["loss"])}, '
             f'grad_norm={float(metrics["grad_norm"])}); the update was not applied')
  if policy == 'stop':
    writer.scalars(step, metrics)
    raise NonFiniteError(message + '. Resume from the last checkpoint with a lower optim.peak_lr, '
                         'or set train.nan_policy=skip.')
  log.warning('%s; skipping (train.nan_policy=skip)', message)
  return 1


class StopSignal:
  """SIGTERM (and SIGINT) request a checkpoint and a clean exit after the current step."""

  def __init__(self):
    self.requested, self._previous = False, {}
    try:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, lambda *_: setattr(self, 'requested', True))
    except ValueError:  # Not the main thread (e.g. some notebook kernels): no handler.
      pass

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
