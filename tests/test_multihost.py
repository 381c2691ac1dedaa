"""Multi-process training: the real CLI on 2 processes x 4 CPU devices, resumed on 1 x 8.

The end-to-end test runs `python -m train` three times on experiments/tiny_dense.py shrunk
further by flags (the 2-process run through scripts/launch_local.sh), with a learning-rate schedule that does not depend on train.steps (warm-up
then constant), so a 3-step run is a prefix of a 6-step one:
  A  2 processes x 4 devices (gloo collectives on localhost), fsdp=8, steps 1-3, checkpoint at 3;
  B  1 process x 8 devices, resumes A's checkpoint (params, Adam state, data position), steps 4-6;
  C  1 process x 8 devices, steps 1-6 uninterrupted.
A's losses must equal C's for steps 1-3 and B's must equal C's for steps 4-6 (read back from
the TensorBoard event files). Only process 0 logs the run, its metrics and the `auto` attention
choice; process 1 logs that it joined.

A lost process: one of 2 processes is killed (SIGKILL) and the survivor must exit non-zero within
distributed.peer_timeout_s with one line naming it and the last checkpoint, without a traceback or
JAX's fatal abort: a model-free driver whose survivor is in a collective or at a barrier (process
0, the coordination service's parent, killed too), and (slow) the CLI killed after its first
checkpoint. The other tests check the pieces without
starting processes.
"""

import json
import os
import pathlib
import shutil
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import tiny_dense
from train import distributed
from train.config import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
OVERRIDES = ('--config.model.num_layers=2', '--config.model.d_model=64', '--config.model.mlp_dim=128',
             '--config.data.seq_len=64', '--config.train.global_batch=8', '--config.mesh.fsdp=8',
             '--config.optim.warmup_steps=1', '--config.optim.final_lr_frac=1.0',
             '--config.train.log_every=1', '--config.train.ckpt_every=3',
             '--config.train.eval_every=1000', '--config.train.progress=False',
             '--config.model.attention=auto')  # Resolves to 'xla' at 64 tokens on CPU, logged.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             PYTHONPATH=str(REPO))
  for name in distributed.ENV.values():
    env.pop(name, None)
  return env


def _train(workdir, steps: int, tokenizer: str, processes: int, timeout: float = 600) -> list[str]:
  """Runs the CLI: one process with 8 devices, or `processes` x (8 // processes) devices started
  by scripts/launch_local.sh (the documented local launcher). Returns each process's log."""
  args = [sys.executable, '-m', 'train', '--config', str(REPO / 'experiments/tiny_dense.py'),
          '--workdir', str(workdir), f'--config.train.steps={steps}',
          f'--config.data.tokenizer={tokenizer}', *OVERRIDES]
  logdir = pathlib.Path(f'{workdir}_logs')
  if processes > 1:
    cmd = [str(REPO / 'scripts/launch_local.sh'), '-n', str(processes), '-d', str(8 // processes),
           '-p', str(_free_port()), '-l', str(logdir), '--', *args]
  else:
    cmd = args
  proc = subprocess.run(cmd, cwd=REPO, env=_env(8 // processes), text=True, timeout=timeout,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  assert proc.returncode == 0, f'{processes} process(es) failed:\n{proc.stdout[-4000:]}'
  if processes == 1:
    return [proc.stdout]
  return [(logdir / f'process_{i}.log').read_text() for i in range(processes)]


def read_scalars(tb_dir, tag: str = 'loss') -> dict[int, float]:
  """{step: value} of `tag` from the TFRecord event files tensorboardX wrote."""
  from tensorboardX.proto import event_pb2
  out = {}
  for path in sorted(pathlib.Path(tb_dir).glob('events.out.tfevents.*')):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4  # length, its crc, the record, its crc.
      for value in event.summary.value:
        if value.tag == tag:
          out[event.step] = value.simple_value
  return out


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  """One tokenizer trained here for all runs (so no run spends its time training one)."""
  from data import pipeline
  c = tiny_dense.get_config()
  c.data.tokenizer_docs = 500
  tok = pipeline.load_tokenizer(c.data, vocab_size=c.model.vocab_size,
                                workdir=str(tmp_path_factory.mktemp('tok')))
  return tok.path


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_checkpoint_resumes_on_one(tmp_path, tokenizer):
  """2 x 4 devices (fsdp=8 across processes) for 3 steps, resumed on 1 x 8 to the same loss."""
  t0 = time.monotonic()
  logs_a = _train(tmp_path / 'a', 3, tokenizer, processes=2)
  t_a = time.monotonic() - t0
  assert 'process 1 of 2, 4 local / 8 global devices' in logs_a[1]
  # Run logs, metrics and the attention choice come from process 0; process 1 only joins.
  for line in ('model FLOPs/token', 'attention auto -> xla', 'step 3: '):
    assert line in logs_a[0] and line not in logs_a[1], line
  saved = json.loads((tmp_path / 'a/checkpoints/3/data/metadata').read_text())
  assert saved['format'] == distributed.STATE_FORMAT
  assert [s['signature']['process_index'] for s in saved['process_states']] == [0, 1]
  assert len(list((tmp_path / 'a/tb').glob('events.out.tfevents.*'))) == 1  # Process 0's only.

  shutil.copytree(tmp_path / 'a/checkpoints', tmp_path / 'b/checkpoints')
  logs_b = _train(tmp_path / 'b', 6, tokenizer, processes=1)
  assert 'resuming from step 3' in logs_b[0]
  _train(tmp_path / 'c', 6, tokenizer, processes=1)

  a, b, c = (read_scalars(tmp_path / d / 'tb') for d in 'abc')
  assert sorted(a) == [1, 2, 3] and sorted(b) == [4, 5, 6] and sorted(c) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([a[s] for s in (1, 2, 3)], [c[s] for s in (1, 2, 3)], rtol=2e-5)
  np.testing.assert_allclose([b[s] for s in (4, 5, 6)], [c[s] for s in (4, 5, 6)], rtol=2e-5)
  assert c[6] < c[1] - 0.05  # It trained: a constant loss would make the comparison vacuous.
  print(f'2-process run {t_a:.0f} s; whole test {time.monotonic() - t0:.0f} s; losses {c}')


def test_local_launcher_passes_distributed_flags():
  env = dict(_env(4), DRY_RUN='1', PYTHON=sys.executable)
  out = subprocess.run([str(REPO / 'scripts/launch_local.sh'), '-n', '3', '-d', '2', '-p', '1234',
                        '-l', '/tmp/unused', '--', 'python', '-m', 'train', '--workdir', 'w'],
                       env=env, text=True, capture_output=True, check=True).stdout.splitlines()
  assert len(out) == 3
  for i, line in enumerate(out):
    assert 'XLA_FLAGS=--xla_force_host_platform_device_count=2' in line
    assert ('python -m train --workdir w --config.distributed.enabled=True '
            '--config.distributed.coordinator_address=localhost:1234 '
            f'--config.distributed.num_processes=3 --config.distributed.process_id={i}') in line


def _iterators(tokenizer, process_count: int, global_batch: int = 8):
  from data import pipeline
  c = tiny_dense.get_config()
  c.data.tokenizer = tokenizer
  c.data.seq_len = 32
  return [pipeline.make_iterator(c.data, vocab_size=c.model.vocab_size, global_batch=global_batch,
                                 workdir='', process_index=p, process_count=process_count)
          for p in range(process_count)]


def _stacked_next(iterators) -> dict:
  batches = [next(it) for it in iterators]
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.mark.parametrize('before, after', [(2, 1), (1, 4), (4, 2), (2, 2)])
def test_data_state_moves_between_process_counts(tokenizer, before, after):
  old = _iterators(tokenizer, before)
  for _ in range(3):
    _stacked_next(old)
  saved = {'format': distributed.STATE_FORMAT, 'process_states': [it.get_state() for it in old]}
  saved = json.loads(json.dumps(saved))  # What the JSON checkpoint item gives back.
  new = _iterators(tokenizer, after)
  for p, it in enumerate(new):
    it.set_state(distributed.local_data_state(saved, p, after))
  for _ in range(2):
    want, got = _stacked_next(old), _stacked_next(new)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_data_state_errors(tokenizer):
  (it0, it1) = _iterators(tokenizer, 2)
  with pytest.raises(ValueError, match='only process 0 of 2'):
    distributed.local_data_state(it0.get_state(), 0, 1)
  bad = {'format': distributed.STATE_FORMAT, 'process_states': [it0.get_state(), it1.get_state()]}
  bad['process_states'][1]['signature']['seq_len'] = 99
  with pytest.raises(ValueError, match='pipelines differ'):
    distributed.local_data_state(bad, 0, 1)
  (solo,) = _iterators(tokenizer, 1)
  assert distributed.local_data_state(solo.get_state(), 0, 1) == solo.get_state()  # Old format.


def test_gather_on_one_process():
  state = {'grain': {'parents': [1, 2]}, 'signature': {'global_batch': 2}}
  assert distributed.gather_data_state(state) == {'format': distributed.STATE_FORMAT,
                                                  'process_states': [state]}


class _Cfg:
  def __init__(self, **kw):
    self.enabled, self.coordinator_address, self.num_processes, self.process_id = False, '', 0, -1
    self.peer_timeout_s = 0.0
    self.__dict__.update(kw)


def test_settings_from_config_env_and_errors():
  env = {'MESHLM_DISTRIBUTED': '1', 'MESHLM_COORDINATOR_ADDRESS': 'h:1', 'MESHLM_NUM_PROCESSES': '4',
         'MESHLM_PROCESS_ID': '3'}
  s = distributed.settings(_Cfg(), env)
  assert (s.enabled, s.coordinator_address, s.num_processes, s.process_id) == (True, 'h:1', 4, 3)
  s = distributed.settings(_Cfg(enabled=True, coordinator_address='c:2', num_processes=2, process_id=0), env)
  # JAX's heartbeat and shutdown timeouts: twice distributed.peer_timeout_s (default 10 s).
  backstop = {'heartbeat_timeout_seconds': 20, 'shutdown_timeout_seconds': 20}
  assert s.initialize_kwargs() == {'coordinator_address': 'c:2', 'num_processes': 2, 'process_id': 0,
                                   **backstop}
  # Enabled with nothing given: everything left to JAX's cluster detection (SLURM, Open MPI, TPU).
  assert distributed.settings(_Cfg(enabled=True), {}).initialize_kwargs() == backstop
  assert distributed.settings(_Cfg(enabled=True), {'MESHLM_CLUSTER': 'slurm'}).initialize_kwargs() == {
      'cluster_detection_method': 'slurm', **backstop}
  assert distributed.settings(_Cfg(), {'MESHLM_PEER_TIMEOUT_S': '3.5'}).peer_timeout_s == 3.5
  assert distributed.settings(_Cfg(peer_timeout_s=4.0), {'MESHLM_PEER_TIMEOUT_S': '3.5'}).initialize_kwargs() == {
      'heartbeat_timeout_seconds': 8, 'shutdown_timeout_seconds': 8}
  with pytest.raises(ConfigError, match='MESHLM_PEER_TIMEOUT_S=.soon. is not a number'):
    distributed.settings(_Cfg(), {'MESHLM_PEER_TIMEOUT_S': 'soon'})
  with pytest.raises(ConfigError, match='peer_timeout_s=-1 must be at least 3 s'):
    distributed.settings(_Cfg(peer_timeout_s=-1.0), {})
  assert not distributed.settings(_Cfg(), {}).enabled
  assert not distributed.maybe_initialize(_Cfg(), {})  # Disabled: nothing happens.
  with pytest.raises(ConfigError, match='MESHLM_NUM_PROCESSES'):
    distributed.settings(_Cfg(), {'MESHLM_NUM_PROCESSES': 'two'})
  with pytest.raises(ConfigError, match='process_id=5 is outside'):
    distributed.settings(_Cfg(enabled=True, num_processes=2, process_id=5), {})
  with pytest.raises(ConfigError, match='MESHLM_DISTRIBUTED'):
    distributed.settings(_Cfg(), {'MESHLM_DISTRIBUTED': 'yes please'})


def _stage(stage: str, workdir, steps: int, init_from: str, processes: int) -> list[str]:
  """Runs `python -m train.posttrain` for experiments/tiny_<stage>.py, like _train."""
  flags = [*OVERRIDES[:-1], f'--config.train.init_from={init_from}', f'--config.train.steps={steps}',
           '--config.train.ckpt_every=2']
  flags += [f'--config.{stage}.eval_batches=1'] if stage in ('rm', 'dpo') else []
  args = [sys.executable, '-m', 'train.posttrain', '--config',
          str(REPO / f'experiments/tiny_{stage}.py'), '--workdir', str(workdir), *flags]
  logdir = pathlib.Path(f'{workdir}_logs')
  cmd = args if processes == 1 else [
      str(REPO / 'scripts/launch_local.sh'), '-n', str(processes), '-d', str(8 // processes),
      '-p', str(_free_port()), '-l', str(logdir), '--', *args]
  proc = subprocess.run(cmd, cwd=REPO, env=_env(8 // processes), text=True, timeout=900,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  assert proc.returncode == 0, f'{stage} on {processes} process(es) failed:\n{proc.stdout[-4000:]}'
  return [proc.stdout] if processes == 1 else [(logdir / 'process_0.log').read_text()]


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory, tokenizer):
  """A 1-step LM run on one process: what the stages start from (its tokenizer: `tokenizer`)."""
  workdir = tmp_path_factory.mktemp('pretrained')
  _train(workdir, 1, tokenizer, processes=1)
  return str(workdir)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize('stage', ['sft', 'rm', 'dpo'])
def test_stage_on_two_processes_resumes_on_one(tmp_path, pretrained, stage):
  """SFT, RM, DPO: 2 x 4 devices for 2 steps, resumed on 1 x 8 for steps 3-4, equal to a
  straight 1 x 8 run (the data state of both processes is in the checkpoint)."""
  _stage(stage, tmp_path / 'a', 2, pretrained, processes=2)
  saved = json.loads((tmp_path / 'a/checkpoints/2/data/metadata').read_text())
  assert [s['signature']['process_index'] for s in saved['process_states']] == [0, 1]
  shutil.copytree(tmp_path / 'a/checkpoints', tmp_path / 'b/checkpoints')
  logs_b = _stage(stage, tmp_path / 'b', 4, pretrained, processes=1)
  assert 'resuming from step 2' in logs_b[0]
  _stage(stage, tmp_path / 'c', 4, pretrained, processes=1)
  a, b, c = (read_scalars(tmp_path / d / 'tb') for d in 'abc')
  assert sorted(a) == [1, 2] and sorted(b) == [3, 4] and sorted(c) == [1, 2, 3, 4]
  np.testing.assert_allclose([a[s] for s in (1, 2)], [c[s] for s in (1, 2)], rtol=2e-5)
  np.testing.assert_allclose([b[s] for s in (3, 4)], [c[s] for s in (3, 4)], rtol=2e-5)


def _lost_host(tmp_path, args, env: dict, ready, victim: int = 1) -> tuple[float, str]:
  """Starts `args(i)` as process i = 0, 1, waits for `ready()`, kills `victim` with SIGKILL and
  returns (seconds from the kill to the survivor's exit, the survivor's output). Start-up may
  take minutes on a loaded machine; only the exit is timed."""
  procs, logs = [], [tmp_path / f'process_{i}.log' for i in range(2)]
  for i in range(2):
    with open(logs[i], 'w') as log:
      procs.append(subprocess.Popen(args(i), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  try:
    deadline = time.monotonic() + 600
    while not ready():
      assert all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
      assert time.monotonic() < deadline, 'the run never got ready'
      time.sleep(0.05)
    procs[victim].kill()
    t_kill = time.monotonic()
    rc = procs[1 - victim].wait(timeout=120)
    elapsed = time.monotonic() - t_kill
  finally:
    for p in procs:
      p.kill()
  out = logs[1 - victim].read_text()
  assert rc != 0, out[-3000:]
  return elapsed, out


def _assert_one_clean_line(out: str, lost: int, step: int) -> str:
  lines = [line for line in out.splitlines() if 'lost process' in line]
  assert len(lines) == 1, out[-3000:]
  assert lines[0].startswith(f'error: lost process {lost} of 2 '), lines[0]
  assert f'the last checkpoint is step {step} in ' in lines[0], lines[0]
  for noise in ('Traceback', 'Fatal Python error', 'Check failure stack trace', 'Terminating process'):
    assert noise not in out, f'{noise!r} in the survivor\'s output:\n{out[-3000:]}'
  return lines[0]


# A run's body without a model: the survivor (process 0) is in a collective (the main thread gets
# gloo's error) or waits at a coordination-service barrier the killed peer never reaches (no
# error: only the beat thread notices), or both raise. Process 0 writes argv[4] when both are
# under way.
_DRIVER = """
import pathlib, sys, time
import ml_collections, numpy as np
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils
from train import distributed
address, pid, workdir, ready, mode = sys.argv[1:]
cfg = ml_collections.ConfigDict(dict(enabled=True, coordinator_address=address, num_processes=2,
                                     process_id=int(pid), peer_timeout_s=0.0))
with distributed.exit_on_lost_peer(workdir):
  distributed.maybe_initialize(cfg)
  for i in range(20):
    multihost_utils.process_allgather(np.array([i]))
  if pid == '0':
    pathlib.Path(ready).touch()
  if mode == 'raise':
    raise RuntimeError('a bug on every process')
  while mode == 'collective':
    multihost_utils.process_allgather(np.array([i]))
  if pid == '0':
    jax_distributed.global_state.client.wait_at_barrier('never_reached', 10**8)
  time.sleep(10**6)
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize('mode, timeout_s, victim', [('collective', None, 1), ('barrier', 3, 1),
                                                     ('collective', 3, 0)])
def test_lost_process_in_collective_or_barrier(tmp_path, mode, timeout_s, victim):
  """Process `victim` of 2 is killed (process 0 too: it started the coordination service, which
  outlives it); the other exits non-zero within distributed.peer_timeout_s (the default, or
  MESHLM_PEER_TIMEOUT_S) plus two beats, with one line naming the victim and the last finalized
  checkpoint (not the unfinished save beside it)."""
  (tmp_path / 'run/checkpoints/7').mkdir(parents=True)
  (tmp_path / 'run/checkpoints/9.orbax-checkpoint-tmp-1').mkdir()
  ready = tmp_path / 'ready'
  env = _env(2) | ({distributed.ENV['peer_timeout_s']: str(timeout_s)} if timeout_s else {})
  port = _free_port()
  args = lambda i: [sys.executable, '-c', _DRIVER, f'localhost:{port}', str(i), str(tmp_path / 'run'), str(ready), mode]
  elapsed, out = _lost_host(tmp_path, args, env, ready.exists, victim)
  _assert_one_clean_line(out, lost=victim, step=7)
  timeout_s = timeout_s or distributed.PEER_TIMEOUT_S
  assert elapsed < timeout_s + 2 * distributed.BEAT_S, (elapsed, out[-2000:])
  print(f'{mode}: process {victim} killed, the survivor exited {elapsed:.1f} s later '
        f'(peer_timeout_s={timeout_s:g})')


@pytest.mark.multiprocess
def test_error_on_every_process_is_not_a_lost_process(tmp_path):
  """Both processes raise: each reports its own error once the peer's counter moved (seconds,
  not the 60 s peer_timeout_s set here), and no process is called lost."""
  port, ready = _free_port(), tmp_path / 'ready'
  procs = [subprocess.Popen([sys.executable, '-c', _DRIVER, f'localhost:{port}', str(i), str(tmp_path),
                             str(ready), 'raise'], cwd=REPO, env=_env(2) | {'MESHLM_PEER_TIMEOUT_S': '60'},
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  deadline = time.monotonic() + 300
  while not ready.exists() and time.monotonic() < deadline and procs[0].poll() is None:
    time.sleep(0.05)
  t_ready = time.monotonic()
  outs = [p.communicate(timeout=300)[0] for p in procs]
  elapsed = time.monotonic() - t_ready
  for p, out in zip(procs, outs):
    assert p.returncode == 1 and 'RuntimeError: a bug on every process' in out, out[-3000:]
    assert 'lost process' not in out, out[-3000:]
  assert elapsed < 30, elapsed
  print(f'both processes reported their error {elapsed:.1f} s after raising')


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize('victim', [1, 0])
def test_lost_process_ends_the_survivor_with_one_line(tmp_path, tokenizer, victim):
  """The CLI on 2 processes with the default distributed.peer_timeout_s: process `victim` is
  killed (SIGKILL) after the first checkpoint; the other exits non-zero within 30 s of the kill
  with one line naming the victim and the newest checkpoint on disk, without a traceback or
  JAX's fatal abort."""
  from orbax.checkpoint import utils as ocp_utils
  workdir, port = tmp_path / 'run', _free_port()
  args = lambda i: [
      sys.executable, '-m', 'train', '--config', str(REPO / 'experiments/tiny_dense.py'),
      '--workdir', str(workdir), '--config.train.steps=100000', f'--config.data.tokenizer={tokenizer}',
      *OVERRIDES, '--config.distributed.enabled=True', '--config.distributed.num_processes=2',
      f'--config.distributed.coordinator_address=localhost:{port}', f'--config.distributed.process_id={i}']
  ckpts = workdir / 'checkpoints'
  ready = lambda: ckpts.is_dir() and ocp_utils.checkpoint_steps(ckpts)
  elapsed, out = _lost_host(tmp_path, args, _env(4), ready, victim)
  line = _assert_one_clean_line(out, lost=victim, step=max(ocp_utils.checkpoint_steps(ckpts)))
  assert elapsed < 30, (elapsed, line)
  print(f'survivor exited {elapsed:.1f} s after the kill: {line}')
