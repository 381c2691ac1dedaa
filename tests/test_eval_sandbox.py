"""The sandbox contains hostile programs in every isolation tier that works on this machine."""

import logging
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile

import pytest

from train.eval import sandbox

LIMITS = sandbox.Limits(timeout_s=1.5)
IS_ROOT = os.geteuid() == 0


def _require(tier):
  outcome = sandbox.probe(tier)
  if not outcome.passed:
    pytest.skip(f'sandbox tier {tier} does not work here: {outcome.detail.strip()[-200:]}')


@pytest.fixture(scope='module')
def private_canary():
  """A file in a 0700 directory of the test's user, outside any sandbox tmp dir."""
  folder = pathlib.Path(tempfile.mkdtemp(prefix='meshlm-canary-', dir=os.path.expanduser('~')))
  canary = folder / 'canary.txt'
  canary.write_text('alive')
  yield canary
  shutil.rmtree(folder)


@pytest.fixture(scope='module')
def open_canary():
  """A world-writable file in a world-writable folder: only a read-only filesystem guards it."""
  folder = pathlib.Path(tempfile.mkdtemp(prefix='meshlm-canary-', dir='/var/tmp'))
  folder.chmod(0o777)
  canary = folder / 'canary.txt'
  canary.write_text('alive')
  canary.chmod(0o666)
  yield canary
  shutil.rmtree(folder)


@pytest.fixture(scope='module')
def listener():
  """A TCP server on the host's loopback that a networked program could reach."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    s.listen()
    yield s.getsockname()[1]


def _cases(private_canary, open_canary, port):
  """name -> (source, statuses it may end with). Programs that must not pass end with `pass`."""
  return {
      'ok': ('print("hello")', {'passed'}),
      'exception': ('raise ValueError("boom")', {'failed'}),
      'sleep_forever': ('import time\ntime.sleep(10**6)', {'timeout'}),
      'busy_loop': ('while True:\n  pass', {'timeout'}),
      'read_stdin_line': ('input()', {'failed'}),
      'read_stdin_all': ('import sys\nassert sys.stdin.read()', {'failed'}),
      'exit_zero': ('import sys\nsys.exit(0)', {'failed'}),
      'os_exit_zero': ('import os\nos._exit(0)', {'failed'}),
      'fork_bomb': ('import os\nwhile True:\n  os.fork()', {'failed', 'timeout'}),
      'fork_bomb_persistent': ('import os\nwhile True:\n  try:\n    os.fork()\n'
                               '  except OSError:\n    pass', {'failed', 'timeout'}),
      'unbounded_memory': ('x = []\nwhile True:\n  x.append(bytearray(1 << 24))',
                           {'failed', 'timeout'}),
      'huge_file': ('with open("big", "wb") as f:\n  f.write(b"x" * (1 << 26))', {'failed'}),
      'output_flood': ('while True:\n  print("x" * 10000)', {'failed', 'timeout'}),
      'delete_private_canary': (f'import os, shutil\np = {str(private_canary)!r}\n'
                                f'try:\n  os.remove(p)\nexcept OSError:\n  pass\n'
                                f'shutil.rmtree(os.path.dirname(p))', {'failed'}),
      'delete_open_canary': (f'import os\nos.remove({str(open_canary)!r})', {'failed'}),
      'write_outside_tmp': (f'open({str(open_canary.parent / "new.txt")!r}, "w").write("x")',
                            {'failed'}),
      'network': (f'import socket\nsocket.create_connection(("127.0.0.1", {port}), timeout=1)',
                  {'failed'}),
      'pid_namespace': ('import os\nassert len([p for p in os.listdir("/proc") if p.isdigit()])'
                        ' < 8', {'passed'}),
      'private_tmp': ('import os\nassert not [f for f in os.listdir("/tmp")'
                      ' if f.startswith("pytest")]\nopen("/tmp/scratch", "w").write("ok")'
                      '\nassert open("/tmp/scratch").read()',
                      {'passed'}),
  }


# Cases a tier does not claim to contain; they are skipped there, not asserted.
_NOT_CONTAINED = {
    'bwrap': set(),
    'unshare': {'delete_open_canary', 'write_outside_tmp', 'private_tmp'},
    'rlimits': {'delete_open_canary', 'write_outside_tmp', 'private_tmp', 'network',
                'pid_namespace'},
}
if not IS_ROOT:  # No unprivileged uid: the program may touch the user's own files.
  _NOT_CONTAINED['unshare'] |= {'delete_private_canary'}
  _NOT_CONTAINED['rlimits'] |= {'delete_private_canary'}

_CASE_NAMES = list(_cases(pathlib.Path('/x/y'), pathlib.Path('/x/y'), 1))
_runs = {}


@pytest.fixture(scope='module')
def run_tier(private_canary, open_canary, listener):
  """Runs all cases of a tier at once (in parallel), once per module."""

  def run(tier):
    if tier not in _runs:
      _require(tier)
      cases = {name: case for name, case in _cases(private_canary, open_canary, listener).items()
               if name not in _NOT_CONTAINED[tier]}  # Never run what the tier cannot contain.
      outcomes = sandbox.run_programs([src for src, _ in cases.values()], limits=LIMITS,
                                      isolation=tier, workers=4)
      _runs[tier] = {name: (o, cases[name][1]) for name, o in zip(cases, outcomes)}
    return _runs[tier]

  return run


@pytest.mark.parametrize('case', _CASE_NAMES)
@pytest.mark.parametrize('tier', sandbox.TIERS)
def test_contained(tier, case, run_tier, private_canary, open_canary):
  if case in _NOT_CONTAINED[tier]:
    pytest.skip(f'tier {tier} does not isolate against {case}')
  outcome, expected = run_tier(tier)[case]
  assert outcome.status in expected, (case, outcome)
  assert private_canary.read_text() == 'alive'
  if 'open_canary' in case or case == 'write_outside_tmp':
    assert open_canary.read_text() == 'alive'
    assert not (open_canary.parent / 'new.txt').exists()


@pytest.mark.parametrize('tier', sandbox.TIERS)
def test_machine_unharmed(tier, run_tier):
  run_tier(tier)
  # Nothing of the sandbox uids is left running, and this process can still start processes.
  if IS_ROOT:
    for slot in range(sandbox.MAX_SLOTS):
      assert not sandbox._pids_of_uid(sandbox._slot_uid(slot)), slot
  assert subprocess.run(['true'], check=False).returncode == 0


def test_timeout_is_quick():
  tier = sandbox.isolation_name()
  outcome = sandbox.run_program('import time\ntime.sleep(60)', isolation=tier,
                                limits=sandbox.Limits(timeout_s=0.5))
  assert outcome.status == 'timeout'
  assert 0.5 <= outcome.seconds < 5


def test_limits_bite():
  """The process and memory limits (not just the timeout) stop a fork bomb and a memory hog."""
  tier = sandbox.isolation_name()
  fork, memory = sandbox.run_programs(
      ['import os\nwhile True:\n  os.fork()',
       'x = []\nwhile True:\n  x.append(bytearray(1 << 24))'],
      isolation=tier, limits=sandbox.Limits(timeout_s=20))
  assert fork.status == 'failed' and 'Resource temporarily unavailable' in fork.detail, fork
  assert memory.status == 'failed' and 'MemoryError' in memory.detail, memory


def test_isolation_name_is_strongest_available(monkeypatch):
  monkeypatch.delenv(sandbox.ENV_TIER, raising=False)
  name = sandbox.isolation_name()
  assert name == sandbox.available_tiers()[0]
  assert sandbox.isolation_description(name)
  print(f'sandbox isolation here: {name}: {sandbox.isolation_description(name)}')


def test_forced_tier(monkeypatch):
  monkeypatch.setenv(sandbox.ENV_TIER, 'rlimits')
  assert sandbox.isolation_name() == 'rlimits'
  monkeypatch.setenv(sandbox.ENV_TIER, 'chroot')
  with pytest.raises(sandbox.SandboxError, match='MESHLM_SANDBOX'):
    sandbox.isolation_name()


def test_fallback_warns_when_no_namespaces(monkeypatch, caplog):
  monkeypatch.delenv(sandbox.ENV_TIER, raising=False)
  real_probe = sandbox.probe
  monkeypatch.setattr(sandbox, 'probe', lambda tier: (
      sandbox.Outcome('error', 'disabled by test', 0.0) if tier != 'rlimits' else real_probe(tier)))
  monkeypatch.setattr(sandbox, '_warned', [])
  with caplog.at_level(logging.WARNING):
    assert sandbox.isolation_name() == 'rlimits'
  assert 'resource limits only' in caplog.text


def test_bad_limits():
  with pytest.raises(ValueError, match='timeout_s'):
    sandbox.Limits(timeout_s=0)
