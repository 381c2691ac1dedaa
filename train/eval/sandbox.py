"""Runs untrusted Python programs, one separate, isolated, resource-limited process each.

Tiers, strongest first (`TIERS`; README, "HumanEval isolation"): `isolation_name()` picks the first
that works here, or the one env MESHLM_SANDBOX names. In every tier stdin is /dev/null, the
environment minimal, a runner sets the rlimits before it compiles the program (no `preexec_fn`: the
caller is multi-threaded), and the parent kills it after `Limits.timeout_s` of run time. As root
each worker slot runs as its own unprivileged uid (root ignores RLIMIT_NPROC); strays are killed.

A program passes when it runs to its end: exit code 0 and the runner's end marker (a random nonce on
a private pipe), so an accidental `exit(0)` fails; the marker guards against accidents, not forgery.
"""

import concurrent.futures
import dataclasses
import itertools
import logging
import os
import pathlib
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

TIERS = {  # Strongest first: what each isolates.
    'bwrap': ('bubblewrap: user/pid/net/ipc/uts/cgroup namespaces, read-only filesystem, '
              'private tmpfs /tmp and /run, rlimits'),
    'unshare': ('util-linux unshare: user/pid/net/ipc/uts/mount namespaces, filesystem guarded '
                'by permissions only, rlimits'),
    'rlimits': 'no namespaces: separate process with rlimits and a timeout only',
}
ENV_TIER = 'MESHLM_SANDBOX'
ENV_PYTHON = 'MESHLM_SANDBOX_PYTHON'
MAX_SLOTS = 16

# Runs inside the sandbox: argv = status_fd nonce program_path as nproc fsize cpu nofile.
_RUNNER = '''
import os, resource, sys
fd, nonce, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
names = ('RLIMIT_AS', 'RLIMIT_NPROC', 'RLIMIT_FSIZE', 'RLIMIT_CPU', 'RLIMIT_NOFILE', 'RLIMIT_CORE')
for name, value in zip(names, [int(v) for v in sys.argv[4:9]] + [0]):
  res = getattr(resource, name)
  hard = resource.getrlimit(res)[1]
  value = value if hard == resource.RLIM_INFINITY else min(value, hard)
  resource.setrlimit(res, (value, value))
with open(path, encoding='utf-8') as f:
  source = f.read()
sys.argv = [path]
os.write(fd, b'S')
try:
  exec(compile(source, path, 'exec'), {'__name__': '__main__', '__builtins__': __builtins__})
except SystemExit as e:
  sys.stdout.flush()
  print('program called exit(%r) before its end' % (e.code,), file=sys.stderr, flush=True)
  os._exit(3)
sys.stdout.flush()
sys.stderr.flush()
os.write(fd, nonce.encode())
os._exit(0)
'''

_PROBE = 'import hashlib, json, math, re\nassert math.isqrt(16) == 4\n'


class SandboxError(RuntimeError):
  """The sandbox cannot be set up (no usable interpreter, or a requested tier does not work)."""


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-program limits. `timeout_s` counts from the runner's start, not the process start."""

  timeout_s: float = 3.0  # The reference HumanEval timeout.
  startup_timeout_s: float = 60.0  # Sandbox + interpreter start-up, generous for loaded hosts.
  memory_bytes: int = 512 << 20  # RLIMIT_AS (address space, not resident memory).
  max_processes: int = 32  # RLIMIT_NPROC.
  file_bytes: int = 16 << 20  # RLIMIT_FSIZE: largest file (and output) it may write.
  open_files: int = 128  # RLIMIT_NOFILE.
  tmpfs_bytes: int = 64 << 20  # Size of the private /tmp (bwrap tier).
  output_chars: int = 2000  # Tail of stdout+stderr kept in Outcome.detail.

  def __post_init__(self):
    if bad := [f.name for f in dataclasses.fields(self) if getattr(self, f.name) <= 0]:
      raise ValueError(f'sandbox Limits.{bad[0]} must be > 0, got {getattr(self, bad[0])}')


@dataclasses.dataclass(frozen=True)
class Outcome:
  """How one program ended. status: passed | failed | timeout | error (the sandbox itself)."""

  status: str
  detail: str
  seconds: float

  @property
  def passed(self) -> bool:
    return self.status == 'passed'


def isolation_description(name: str | None = None) -> str:
  return TIERS[name or isolation_name()]


def _slot_uid(slot: int) -> int | None:
  """As root: an unprivileged uid private to this process and slot; otherwise None."""
  if os.geteuid() != 0:
    return None
  if not 0 <= slot < MAX_SLOTS:
    raise ValueError(f'sandbox slot {slot} outside [0, {MAX_SLOTS})')
  return 100_000 + os.getpid() * MAX_SLOTS + slot


def _drop_to(uid: int | None) -> tuple[list[str], dict]:
  """argv prefix and Popen kwargs that run the command as `uid` (nothing for None); `setpriv`
  first, so that Popen can vfork (its `user=` forks, copying a large parent's page tables)."""
  if uid is None:
    return [], {}
  if setpriv := shutil.which('setpriv'):
    return [setpriv, f'--reuid={uid}', f'--regid={uid}', '--clear-groups', '--'], {}
  return [], dict(user=uid, group=uid, extra_groups=[])


def _others_can_run(path: str) -> bool:
  """True when a stranger uid can traverse to and execute (a folder: enter) `path`."""
  p = pathlib.Path(path)
  return all(os.stat(d).st_mode & stat.S_IXOTH for d in (p, *p.parents))


def sandbox_python(drop_uid: bool) -> str:
  """env MESHLM_SANDBOX_PYTHON, else this interpreter's base (stdlib only), else a system python3
  where a stranger uid (`drop_uid`) cannot reach it (e.g. a pyenv build under /root)."""
  if os.environ.get(ENV_PYTHON):
    return os.environ[ENV_PYTHON]
  system = [shutil.which('python3', path=d) for d in ('/usr/bin', '/usr/local/bin', '/bin')]
  candidates = [os.path.realpath(p) for p in (sys.executable, *system) if p]
  if found := next((c for c in candidates if not drop_uid or _others_can_run(c)), None):
    return found
  raise SandboxError(f'no python interpreter reachable by an unprivileged uid among {candidates}; '
                     f'set {ENV_PYTHON}')


def _command(tier: str, python: str, host_dir: str, fd: int, nonce: str,
             limits: Limits) -> tuple[list[str], str]:
  """argv and working directory (on the host) for one run."""
  inside_dir = '/run/sandbox' if tier == 'bwrap' else host_dir
  runner = [python, '-I', '-S', '-c', _RUNNER, str(fd), nonce, f'{inside_dir}/program.py',
            str(limits.memory_bytes), str(limits.max_processes), str(limits.file_bytes),
            str(int(limits.timeout_s) + 2), str(limits.open_files)]  # CPU seconds: a margin.
  work = os.path.join(host_dir, 'work')  # Made by run_program for the tiers without a tmpfs.
  if tier == 'bwrap':
    wrap = [shutil.which('bwrap') or 'bwrap', '--unshare-all', '--die-with-parent',
            '--new-session', '--ro-bind', '/', '/', '--dev', '/dev', '--proc', '/proc',
            '--size', str(limits.tmpfs_bytes), '--tmpfs', '/tmp', '--tmpfs', '/run',
            '--ro-bind', host_dir, inside_dir, '--chdir', '/tmp', '--setenv', 'HOME', '/tmp']
    return wrap + runner, '/'
  if tier == 'unshare':
    wrap = [shutil.which('unshare') or 'unshare', '--map-root-user', '--net', '--pid', '--ipc',
            '--uts', '--fork', '--kill-child', '--mount-proc']
    return wrap + runner, work
  if tier == 'rlimits':
    return runner, work
  raise ValueError(f'unknown sandbox tier {tier!r}; expected one of {tuple(TIERS)}')


def _pids_of_uid(uid: int) -> list[int]:
  """Live (not zombie) processes whose effective uid is `uid`."""
  pids = []
  for entry in filter(str.isdigit, os.listdir('/proc')):
    try:
      if os.stat(f'/proc/{entry}').st_uid != uid:
        continue
      with open(f'/proc/{entry}/stat', 'rb') as f:
        state = f.read().rsplit(b')', 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
      continue
    if state not in (b'Z', b'X'):
      pids.append(int(entry))
  return pids


def _kill_uid(uid: int, python: str):
  """Kills every process of `uid`: kill(-1) from a helper running as that uid spares only itself."""
  for _ in range(100):
    if not _pids_of_uid(uid):
      return
    prefix, ids = _drop_to(uid)
    subprocess.run(prefix + [python, '-I', '-S', '-c', 'import os\nos.kill(-1, 9)'], **ids,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, cwd='/', env={'PATH': '/usr/bin:/bin'}, timeout=30,
                   check=False)
    time.sleep(0.01)
  logging.warning('sandbox: processes of uid %d survive: %s', uid, _pids_of_uid(uid))


def _read_until(fd: int, deadline: float, want: int) -> bytes:
  """Reads from a pipe until `want` bytes, EOF or the deadline."""
  data = b''
  while len(data) < want:
    if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
      break
    chunk = os.read(fd, want - len(data))
    if not chunk:
      break
    data += chunk
  return data


def run_program(source: str, *, limits: Limits = Limits(), isolation: str | None = None,
                slot: int = 0) -> Outcome:
  """Runs one program in the sandbox and says how it ended."""
  tier = isolation or isolation_name()
  uid = _slot_uid(slot)
  python = sandbox_python(uid is not None)
  nonce = secrets.token_hex(16)
  with tempfile.TemporaryDirectory(prefix='meshlm-sandbox-') as host_dir:
    os.chmod(host_dir, 0o755)
    if uid is not None and not _others_can_run(host_dir):
      raise SandboxError(f'TMPDIR {tempfile.gettempdir()} cannot be reached by the unprivileged '
                         f'uid the programs run as (a folder above it is not world-executable); '
                         f'set TMPDIR to one that is, e.g. /tmp')
    program = pathlib.Path(host_dir, 'program.py')
    program.write_text(source, encoding='utf-8')
    program.chmod(0o644)
    if tier != 'bwrap':
      os.mkdir(os.path.join(host_dir, 'work'), 0o700)
      if uid is not None:
        os.chown(os.path.join(host_dir, 'work'), uid, uid)
    read_fd, write_fd = os.pipe()
    argv, cwd = _command(tier, python, host_dir, write_fd, nonce, limits)
    env = {'PATH': '/usr/bin:/bin', 'LANG': 'C.UTF-8', 'HOME': cwd}
    prefix, ids = _drop_to(uid)
    output = os.path.join(host_dir, 'output.txt')
    try:
      with open(output, 'wb') as out:
        proc = subprocess.Popen(prefix + argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, pass_fds=(write_fd,), cwd=cwd, env=env,
                                start_new_session=True, **ids)
    finally:
      os.close(write_fd)
    timed_out = False
    try:
      started = _read_until(read_fd, time.monotonic() + limits.startup_timeout_s, 1) == b'S'
      t0 = time.monotonic()
      try:  # Not started: it has exited (EOF) or hangs in start-up; either way, end it now.
        proc.wait(timeout=limits.timeout_s if started else 1.0)
      except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
      seconds = time.monotonic() - t0
      marker = _read_until(read_fd, 0.0, 64)  # What the runner wrote, without waiting.
    finally:
      os.close(read_fd)
      if uid is not None and (tier == 'rlimits' or timed_out):
        _kill_uid(uid, python)
    with open(output, 'rb') as f:  # Its tail: the last output_chars characters.
      f.seek(max(0, os.path.getsize(output) - 4 * limits.output_chars))
      detail = f.read().decode('utf-8', 'replace')[-limits.output_chars:]
  if not started:
    return Outcome('error', f'sandbox ({tier}) did not start (exit code {proc.returncode}): '
                   f'{detail}', seconds)
  if timed_out:
    return Outcome('timeout', f'timed out after {limits.timeout_s} s\n{detail}', seconds)
  if proc.returncode == 0 and marker != nonce.encode():
    return Outcome('failed', f'exited before its end\n{detail}', seconds)
  return Outcome('passed' if proc.returncode == 0 else 'failed', detail, seconds)


_probed: dict[str, Outcome] = {}
_probe_lock = threading.Lock()
_warned = []  # The rlimits-only warning is logged once per process.


def probe(tier: str) -> Outcome:
  """Runs a tiny stdlib program under `tier` once per process (cached)."""
  with _probe_lock:
    if tier not in _probed:
      try:
        if tier in ('bwrap', 'unshare') and not shutil.which(tier):
          raise SandboxError(f'{tier} is not installed')
        _probed[tier] = run_program(_PROBE, isolation=tier, limits=Limits(timeout_s=30.0))
      except (OSError, SandboxError) as e:
        _probed[tier] = Outcome('error', str(e), 0.0)
    return _probed[tier]


def available_tiers() -> list[str]:
  """The tiers that run the probe program on this machine, strongest first."""
  return [t for t in TIERS if probe(t).passed]


def isolation_name() -> str:
  """The tier in use: env MESHLM_SANDBOX if set (it must work), else the strongest that works."""
  forced = os.environ.get(ENV_TIER, 'auto')
  if forced != 'auto' and forced not in TIERS:
    raise SandboxError(f'env {ENV_TIER}={forced!r}; expected auto or one of {tuple(TIERS)}')
  for tier in TIERS if forced == 'auto' else (forced,):
    outcome = probe(tier)
    if outcome.passed:
      if tier == 'rlimits' and forced == 'auto' and not _warned:
        _warned.append(True)
        logging.warning('sandbox: neither bubblewrap nor unshare namespaces work here; untrusted '
                        'code runs with resource limits only (no network or filesystem '
                        'isolation). Install bubblewrap: apt-get install -y bubblewrap')
      return tier
    if forced != 'auto':
      raise SandboxError(f'env {ENV_TIER}={forced} does not work here: {outcome.detail}')
    logging.info('sandbox tier %s unavailable: %s', tier, outcome.detail.strip()[-300:])
  raise SandboxError(f'no sandbox tier works here (TMPDIR={tempfile.gettempdir()}): '
                     + '; '.join(f'{t}: {probe(t).detail.strip()[-300:]}' for t in TIERS))


def run_programs(sources: list[str], *, limits: Limits = Limits(), isolation: str | None = None,
                 workers: int | None = None) -> list[Outcome]:
  """Runs programs, `workers` at a time (default 2 per core, 2 to 8: a run is mostly start-up)."""
  tier = isolation or isolation_name()
  workers = min(workers or max(2, min(8, 2 * (os.cpu_count() or 1))), MAX_SLOTS)
  slots, thread = itertools.count(), threading.local()  # Each worker thread has its own slot.

  def one(source: str) -> Outcome:
    return run_program(source, limits=limits, isolation=tier, slot=thread.slot)

  with concurrent.futures.ThreadPoolExecutor(
      max_workers=workers, initializer=lambda: setattr(thread, 'slot', next(slots))) as pool:
    return list(pool.map(one, sources))
