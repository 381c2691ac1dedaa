"""An optional jax.profiler trace of a window of training steps: `train.profile_steps='FIRST:LAST'`
traces the loop's 0-based steps FIRST .. LAST-1 (a resumed run inside the window: its remaining
ones) into `workdir/profile/`, waits for the last one, Python tracer off (docs/observability.md).
"""

import logging

import jax

from model.config import ConfigError

log = logging.getLogger('meshlm')


def parse(spec: str) -> tuple[int, int] | None:
  """'FIRST:LAST' -> (FIRST, LAST); '' -> None."""
  if not spec:
    return None
  try:
    first, last = (int(x) for x in spec.split(':'))
  except ValueError:
    raise ConfigError(f"train.profile_steps={spec!r}: use 'FIRST:LAST', e.g. '10:13'") from None
  if not 0 <= first < last:
    raise ConfigError(f'train.profile_steps={spec!r}: need 0 <= FIRST < LAST (steps FIRST..LAST-1 '
                      f'are traced)')
  return first, last


class TraceWindow:
  """Starts the trace at the window's first step, stops it after its last (or at `close`)."""

  def __init__(self, spec: str, logdir: str):
    self.window, self.logdir = parse(spec), logdir
    self.active = self.finished = False

  def maybe_start(self, step: int):
    if self.window and not (self.active or self.finished) and self.window[0] <= step < self.window[1]:
      options = jax.profiler.ProfileOptions()
      options.python_tracer_level = 0
      jax.profiler.start_trace(self.logdir, profiler_options=options)
      self.active = True
      log.info('profiling steps %d..%d into %s', step, self.window[1] - 1, self.logdir)

  def maybe_stop(self, step: int, state):
    """After step `step` was dispatched; `state` is what it returned (waited for)."""
    if self.active and step + 1 >= self.window[1]:
      jax.block_until_ready(state)
      self.close()

  def close(self):
    if self.active:
      jax.profiler.stop_trace()
      self.active, self.finished = False, True
