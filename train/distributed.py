"""Multi-process start-up, lost-peer detection, and data-iterator state across process counts.

`maybe_initialize` joins JAX's distributed runtime when `distributed.enabled` (values from the
config, else `ENV`, else JAX's cluster detection: docs/scale.md, section 3). `exit_on_lost_peer`: a
peer whose liveness counter (`_Beat`) stands still for `peer_timeout_s` is lost; survivors exit 1
naming it and the last checkpoint (README, "A lost process"). Checkpoints hold each process's data
state (`gather_data_state`), re-split by row on another process count (`local_data_state`).
"""

import atexit
import contextlib
import copy
import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax._src import distributed as jax_distributed  # Its client: the coordinator's key-value store.

from model.config import ConfigError

log = logging.getLogger('meshlm')

ENV = {'enabled': 'MESHLM_DISTRIBUTED', 'coordinator_address': 'MESHLM_COORDINATOR_ADDRESS',
       'num_processes': 'MESHLM_NUM_PROCESSES', 'process_id': 'MESHLM_PROCESS_ID',
       'cluster': 'MESHLM_CLUSTER', 'log_all': 'MESHLM_LOG_ALL_PROCESSES',
       'peer_timeout_s': 'MESHLM_PEER_TIMEOUT_S'}
QUIET_LOGGERS = ('meshlm', 'model', 'train')  # INFO from these only on process 0.
STATE_FORMAT = 'meshlm_per_process_v1'
PEER_TIMEOUT_S = 10.0  # distributed.peer_timeout_s when neither config nor environment sets it.
BEAT_S = 1.0  # How often each process advances its liveness counter.
# The coordination service's process: it stops as JAX's would once process 0 wrote a byte after
# its client's shutdown, is killed by a process 0 that reports a lost peer, and lingers for JAX's
# heartbeat timeout (2 x peer_timeout_s) after process 0 vanished.
_SERVICE = '''
import os, sys, time
from jax._src.lib import _jax
address, num_processes, timeout_s = sys.argv[1:]
service = _jax.get_distributed_runtime_service(address, int(num_processes), heartbeat_timeout=int(
    timeout_s), shutdown_timeout=int(timeout_s))
service.shutdown() if sys.stdin.buffer.read(1) else time.sleep(int(timeout_s))
os._exit(0)
'''


@dataclasses.dataclass(frozen=True)
class Settings:
  enabled: bool
  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  cluster: str | None  # A JAX cluster detector name ('slurm', 'ompi', ...), None: auto.
  peer_timeout_s: float = PEER_TIMEOUT_S

  def initialize_kwargs(self) -> dict:
    kw = {'coordinator_address': self.coordinator_address, 'num_processes': self.num_processes,
          'process_id': self.process_id, 'cluster_detection_method': self.cluster}
    backstop = max(1, round(2 * self.peer_timeout_s))  # JAX's timeouts: whole seconds.
    return {k: v for k, v in kw.items() if v is not None} | {
        'heartbeat_timeout_seconds': backstop, 'shutdown_timeout_seconds': backstop}


def _env_number(environ, name: str, kind=int):
  value = environ.get(name, '').strip()
  try:
    return kind(value) if value else None
  except ValueError:
    raise ConfigError(f'environment variable {name}={value!r} is not a{"n integer" if kind is int else " number"}') from None


def settings(dist_cfg, environ=None) -> Settings:
  """The config section merged with the MESHLM_* environment (config wins where set)."""
  environ = os.environ if environ is None else environ
  flag = environ.get(ENV['enabled'], '').strip().lower()
  if flag not in ('', '0', '1', 'true', 'false'):
    raise ConfigError(f'environment variable {ENV["enabled"]}={flag!r}: use 1/0 or true/false')
  enabled = bool(dist_cfg.enabled) or flag in ('1', 'true')
  address = dist_cfg.coordinator_address or environ.get(ENV['coordinator_address'], '') or None
  num = dist_cfg.num_processes if dist_cfg.num_processes > 0 else _env_number(environ, ENV['num_processes'])
  pid = dist_cfg.process_id if dist_cfg.process_id >= 0 else _env_number(environ, ENV['process_id'])
  timeout = (dist_cfg.peer_timeout_s or _env_number(environ, ENV['peer_timeout_s'], float)
             or PEER_TIMEOUT_S)
  if num is not None and num < 1:
    raise ConfigError(f'distributed.num_processes={num} must be positive')
  if pid is not None and num is not None and not 0 <= pid < num:
    raise ConfigError(f'distributed.process_id={pid} is outside [0, num_processes={num})')
  if timeout < 3 * BEAT_S:  # A live peer's counter can seem to stand still for 2 beats.
    raise ConfigError(f'distributed.peer_timeout_s={timeout:g} must be at least {3 * BEAT_S:g} s')
  return Settings(enabled, address, num, pid, environ.get(ENV['cluster'], '').strip() or None, timeout)


def maybe_initialize(dist_cfg, environ=None) -> bool:
  """Joins the distributed runtime if enabled; True if this call initialised it."""
  s = settings(dist_cfg, environ)
  if not s.enabled or jax.distributed.is_initialized():
    return False
  kwargs = s.initialize_kwargs()
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # Only read by the CPU backend.
  if s.process_id == 0 and s.coordinator_address and (s.num_processes or 0) > 1:
    kwargs['coordinator_bind_address'] = 'localhost:0'  # JAX's in-process service, left unused.
    _start_service(s.coordinator_address, s.num_processes, kwargs['heartbeat_timeout_seconds'])
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as e:  # JAX's message for missing values when no cluster was detected.
    raise ConfigError(
        f'distributed.enabled: {e} Give distributed.coordinator_address, num_processes and '
        f'process_id (flags --config.distributed.* or {ENV["coordinator_address"]}, '
        f'{ENV["num_processes"]}, {ENV["process_id"]}), or run under SLURM, Open MPI or a TPU '
        f'pod, whose environment JAX reads. Given: {kwargs}') from e
  log.info('jax.distributed: process %d of %d, %d local / %d global devices (%s)', jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count(),
           'explicit' if s.coordinator_address else 'auto-detected')
  environ = os.environ if environ is None else environ
  if jax.process_index() != 0 and environ.get(ENV['log_all'], '').strip() not in ('1', 'true'):
    for name in QUIET_LOGGERS:
      logging.getLogger(name).setLevel(logging.WARNING)
  if jax.process_count() > 1:
    global _beat
    _beat = _Beat(jax_distributed.global_state.client, s.peer_timeout_s)
  return True


def _start_service(address: str, num_processes: int, timeout_s: int):
  global _service
  _service = subprocess.Popen([sys.executable, '-c', _SERVICE, '[::]:' + address.rsplit(':', 1)[1],
                               str(num_processes), str(timeout_s)], stdin=subprocess.PIPE)
  # At exit, JAX's order: every client leaves (a barrier), then the service stops.
  atexit.register(lambda: (jax.distributed.shutdown(), _service.communicate(b'x')))


class _Beat:
  """This process's liveness counter in the key-value store, advanced every BEAT_S; its thread ends
  the process (`_exit_lost`) once a peer's stood still for `timeout_s` (and is not 'done')."""

  def __init__(self, client, timeout_s: float):
    self.client, self.timeout_s = client, timeout_s
    self.me, self.count = jax.process_index(), jax.process_count()
    # Per peer: its last counter value and a time before which it was written.
    self.moved = {p: (None, time.monotonic()) for p in range(self.count) if p != self.me}
    self.stop = threading.Event()
    self.thread = threading.Thread(target=self._run, name='meshlm-beat', daemon=True)
    self.thread.start()
    atexit.register(self.stop.set)  # Before JAX's own atexit shutdown (registered earlier).

  def _run(self):
    beat, previous = 0, time.monotonic()
    while not self.stop.wait(BEAT_S):
      beat, start = beat + 1, time.monotonic()
      try:
        self.client.key_value_set(f'meshlm/beat/{self.me}', str(beat), allow_overwrite=True)
        counters = dict(self.client.key_value_dir_get('meshlm/beat/'))
      except Exception:  # The store is unreachable: nobody moves, and process 0 started it.
        counters = None
      if counters is not None:
        for p, (seen, _) in self.moved.items():
          value = counters.get(f'meshlm/beat/{p}')
          if value != seen or value == 'done':  # Written after the previous read began.
            self.moved[p] = value, float('inf') if value == 'done' else previous
        previous = start
      now = time.monotonic()
      lost = [p for p, (_, t) in self.moved.items() if now - t > self.timeout_s]
      if lost and not self.stop.is_set():
        _exit_lost([0] if 0 in lost else lost, self)

  def finish(self):
    """Marks this process's run finished: peers still finishing theirs do not count it lost."""
    self.stop.set()
    self.thread.join()
    self.client.key_value_set(f'meshlm/beat/{self.me}', 'done', allow_overwrite=True)


_beat: _Beat | None = None  # Set once maybe_initialize joined a run of several processes.
_workdir = '.'  # The run's, for the checkpoint a lost process's message names.
_service: subprocess.Popen | None = None  # On process 0: the coordination service's process.


def _exit_lost(lost: list[int], beat: _Beat):
  root = os.path.join(os.path.abspath(_workdir), 'checkpoints')
  # Read from the directory: a CheckpointManager would wait at a barrier for the lost process.
  step = max(ocp.utils.checkpoint_steps(root), default=None) if os.path.isdir(root) else None
  resume = (f'the last checkpoint is step {step} in {root}: run the same command again to resume '
            f'from it' if step is not None else 'no checkpoint was saved: a new run starts at step 0')
  if beat.me == 0 and beat.count > 2:
    time.sleep(2 * BEAT_S)  # Let the other survivors report before the coordination service goes.
  if _service is not None:
    _service.kill()
  sys.stdout.flush()
  sys.stderr.write(f'error: lost process {", ".join(map(str, lost))} of {beat.count} (no sign of '
                   f'life for {beat.timeout_s:g} s, distributed.peer_timeout_s); {resume}\n')
  sys.stderr.flush()
  os._exit(1)


@contextlib.contextmanager
def exit_on_lost_peer(workdir: str):
  """Around a run in `workdir` (the CLIs' main): a lost peer ends the process (module doc); an
  exception waits for that verdict, up to peer_timeout_s, then propagates."""
  global _workdir
  _workdir = workdir
  try:
    yield
  except Exception:
    if _beat is not None:
      t = time.monotonic()
      while (any(moved <= t for _, moved in _beat.moved.values())
             and time.monotonic() < t + _beat.timeout_s + 2 * BEAT_S):
        time.sleep(BEAT_S / 4)  # The beat thread ends the process if a peer is lost.
      _beat.stop.set()
    raise
  if _beat is not None:
    _beat.finish()


def _allgather_text(text: str) -> list[str]:
  """Each process's `text`, in process order, on every process."""
  if jax.process_count() == 1:
    return [text]
  from jax.experimental import multihost_utils  # Only multi-process runs need it.
  data = np.frombuffer(text.encode('utf-8'), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
  padded = np.pad(data, (0, int(lengths.max()) - data.size))
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [bytes(gathered[i, :lengths[i]]).decode('utf-8') for i in range(len(lengths))]


def gather_data_state(local_state: dict) -> dict:
  """All processes' iterator states, for orbax's JSON item (written by process 0); call on all."""
  states = [json.loads(s) for s in _allgather_text(json.dumps(local_state))]
  return {'format': STATE_FORMAT, 'process_states': states}


def _rows(state: dict, where: str) -> list:
  try:
    rows = state['grain']['parents']
    state['signature']['global_batch']
  except (KeyError, TypeError):
    raise ValueError(f'{where}: the data iterator state has no per-row streams '
                     f"(state['grain']['parents']); it cannot move to another process count") from None
  return list(rows)


def local_data_state(saved: dict, process_index: int, process_count: int) -> dict:
  """This process's iterator state from what `gather_data_state` saved (or a bare state). On
  another process count the row streams are joined in global row order and re-split (row r is
  the same stream whatever the count); batch-indexed pipelines (preference pairs) move as is."""
  if not saved:
    return saved
  if saved.get('format') == STATE_FORMAT:
    states = saved['process_states']
  else:  # A single iterator's state, as a one-process run of older code saved it.
    count = saved.get('signature', {}).get('process_count', 1)
    if count != 1:
      raise ValueError(f'the checkpoint holds only process 0 of {count} processes\' data state '
                       '(written before per-process gathering); the data position of the other '
                       'processes is lost')
    states = [saved]
  if len(states) == process_count:
    return states[process_index]
  where = f'restoring a {len(states)}-process data state on {process_count} processes'
  state = copy.deepcopy(states[0])
  state['signature'].update(process_index=process_index, process_count=process_count)
  if all('parents' not in s.get('grain', {}) and s.get('grain') == states[0].get('grain')
         for s in states):
    return state  # Batch-indexed pipelines (preference pairs): all at the same global batch.
  rows = [row for s in states for row in _rows(s, where)]
  signatures = [{k: v for k, v in s['signature'].items() if k not in ('process_index', 'process_count')}
                for s in states]
  if any(sig != signatures[0] for sig in signatures):
    raise ValueError(f'{where}: the processes\' pipelines differ: {signatures}')
  global_batch = states[0]['signature']['global_batch']
  if len(rows) != global_batch or global_batch % process_count:
    raise ValueError(f'{where}: {len(rows)} row streams for a global batch of {global_batch}, '
                     f'which must split evenly over {process_count} processes')
  local = global_batch // process_count
  state['grain']['parents'] = rows[process_index * local:(process_index + 1) * local]
  return state
