"""Verified checkpoints on real runs: every kind of damage to the newest step is named in one
line, the step is moved aside (nothing deleted) and the run continues from the previous step
exactly as an uninterrupted run did; nothing intact is one clear error; a kill -9 loses at most
one save interval."""

import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from model.config import ConfigError
from tests.util import run_config
from train import checkpoint as ckpt_lib
from train import loop
from train import workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENT = 'from tests.util import run_config\n\n\ndef get_config():\n  return run_config(steps=6, ckpt_every=2)\n'


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """An uninterrupted 6-step run saving steps 2, 4, 6; its workdir and result."""
  workdir = tmp_path_factory.mktemp('straight')
  return workdir, loop.run(run_config(steps=6, ckpt_every=2), str(workdir))


def copy_run(straight, tmp_path) -> pathlib.Path:
  shutil.copytree(straight[0], tmp_path / 'run')
  return tmp_path / 'run'


def params_file(step_dir) -> str:
  """The largest array file of the step (relative path)."""
  files = list((step_dir / 'state' / 'ocdbt.process_0' / 'd').iterdir())
  return str(max(files, key=lambda p: p.stat().st_size).relative_to(step_dir))


def truncate(fraction):
  def damage(step_dir):
    name = params_file(step_dir)
    with open(step_dir / name, 'r+b') as f:
      f.truncate(int(os.path.getsize(step_dir / name) * fraction))
    return name
  return damage


def flip(count, name=None):
  """Inverts `count` bytes spread over the file (default: the largest array file)."""
  def damage(step_dir):
    rel = name or params_file(step_dir)
    data = bytearray((step_dir / rel).read_bytes())
    for i in np.linspace(len(data) // 4, len(data) - 1, count).astype(int):
      data[i] ^= 0xFF
    (step_dir / rel).write_bytes(bytes(data))
    return rel
  return damage


def delete(name):
  def damage(step_dir):
    (shutil.rmtree if (step_dir / name).is_dir() else os.remove)(step_dir / name)
    return name
  return damage


def garbage(name):
  def damage(step_dir):
    (step_dir / name).write_bytes(b'#' * (step_dir / name).stat().st_size)
    return name
  return damage


def empty(step_dir):
  for p in step_dir.iterdir():
    (shutil.rmtree if p.is_dir() else os.remove)(p)
  return 'empty'


DAMAGE = {
    'truncated to half': truncate(0.5),
    'truncated to 0 bytes': truncate(0.0),
    'bytes flipped in place': flip(16),
    '585 bytes flipped in a parameter file': flip(585),
    'bytes flipped in state/_METADATA': flip(4, 'state/_METADATA'),
    'state/_METADATA deleted': delete('state/_METADATA'),
    'manifest.ocdbt deleted': delete('state/manifest.ocdbt'),
    'ocdbt.process_0/ deleted': delete('state/ocdbt.process_0'),
    'data/metadata deleted': delete('data/metadata'),
    'garbage in data/metadata': garbage('data/metadata'),
    'emptied step directory': empty,
}


def steps_on_disk(workdir) -> set[str]:
  return {p.name for p in (workdir / 'checkpoints').iterdir()}


def assert_continues_like(result, straight, first):
  losses = lambda r: {h['step']: h['loss'] for h in r.history if 'loss' in h}
  assert losses(result) == {s: losses(straight)[s] for s in range(first, 7)}
  for x, y in zip(jax.tree.leaves(result.state), jax.tree.leaves(straight.state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('kind', list(DAMAGE))
def test_damaged_newest_step_falls_back(straight, tmp_path, caplog, kind):
  workdir = copy_run(straight, tmp_path)
  named = DAMAGE[kind](workdir / 'checkpoints' / '6')
  with caplog.at_level(logging.WARNING, logger='train.checkpoint'):
    result = loop.run(run_config(steps=6, ckpt_every=2), str(workdir))
  lines = [r.getMessage() for r in caplog.records if r.name == 'train.checkpoint']
  assert len(lines) == 1 and 'checkpoint step 6 is damaged' in lines[0], lines
  assert named in lines[0] and 'falling back to step 4' in lines[0], lines
  assert steps_on_disk(workdir) == {'2', '4', '6', '6.damaged'}  # 6 rewritten by the continuation.
  assert_continues_like(result, straight[1], first=5)


def test_params_of_a_damaged_run_fall_back_too(straight, tmp_path):
  """The tools' and `train.init_from`'s path (workdir.load_run / restore_params)."""
  workdir = copy_run(straight, tmp_path)
  flip(585)(workdir / 'checkpoints' / '6')
  run = workdir_lib.load_run(str(workdir))
  assert run.step == 4 and steps_on_disk(workdir) == {'2', '4', '6.damaged'}


def test_a_step_without_checksums_is_restored_with_a_warning(straight, tmp_path, caplog):
  workdir = copy_run(straight, tmp_path)
  os.remove(workdir / 'checkpoints' / '6' / ckpt_lib.CHECKSUMS)
  with caplog.at_level(logging.WARNING, logger='train.checkpoint'):
    result = loop.run(run_config(steps=6, ckpt_every=2), str(workdir))
  assert 'restoring it unverified' in caplog.text and 'damaged' not in caplog.text
  assert_continues_like(result, straight[1], first=7)  # Resumed at 6: nothing left to train.


def test_nothing_intact_is_one_line_and_moves_nothing(straight, tmp_path):
  workdir = copy_run(straight, tmp_path)
  for step in (2, 4, 6):
    delete('data/metadata')(workdir / 'checkpoints' / str(step))
  with pytest.raises(ConfigError, match=r'no intact checkpoint .*step 6: data/metadata is missing.*step 2'):
    loop.run(run_config(steps=6, ckpt_every=2), str(workdir))
  assert steps_on_disk(workdir) == {'2', '4', '6'}


def test_changed_tie_embeddings_names_the_param(straight, tmp_path):
  workdir = copy_run(straight, tmp_path)
  c = run_config(steps=8, ckpt_every=2)
  c.model.tie_embeddings = True
  with pytest.raises(ConfigError, match=r"has \['head_dv'\], which this run's model lacks \(e.g. model.tie_embeddings"):
    loop.run(c, str(workdir))
  assert steps_on_disk(workdir) == {'2', '4', '6'}


def cli(workdir, *overrides, **kw):
  (workdir.parent / 'experiment.py').write_text(EXPERIMENT)
  args = [sys.executable, '-m', 'train', '--config', str(workdir.parent / 'experiment.py'),
          '--workdir', str(workdir), *overrides]
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  if kw.pop('background', False):
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
  return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def cli_losses(workdir) -> list:
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [(r['step'], r['loss']) for r in rows if 'loss' in r]


def test_cli_falls_back_in_one_line(straight, tmp_path):
  workdir = copy_run(straight, tmp_path)
  named = flip(585)(workdir / 'checkpoints' / '6')
  before = cli_losses(workdir)
  out = cli(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [line for line in out.stderr.splitlines() if 'is damaged' in line]
  assert len(lines) == 1 and 'step 6' in lines[0] and named in lines[0], lines
  assert 'resuming from step 4' in out.stderr
  assert cli_losses(workdir)[len(before):] == [s for s in before if s[0] > 4]


def test_cli_nothing_intact_exits_with_one_line(straight, tmp_path):
  workdir = copy_run(straight, tmp_path)
  for step in (2, 4, 6):
    empty(workdir / 'checkpoints' / str(step))
  out = cli(workdir)
  assert out.returncode == 1 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert out.stderr.strip().splitlines()[-1].startswith('error: no intact checkpoint in ')
  assert steps_on_disk(workdir) == {'2', '4', '6'}


def test_kill_loses_at_most_one_save_interval(tmp_path):
  """kill -9 while saves every 2 steps are being written: the newest committed step is at most 2
  behind the last step logged (metrics are logged before a step's save), and it is intact."""
  workdir = tmp_path / 'run'
  proc = cli(workdir, '--config.train.steps=100000', background=True)
  metrics, deadline = workdir / 'metrics.jsonl', time.time() + 300
  while proc.poll() is None and time.time() < deadline:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 9:
      break
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.communicate(timeout=60)
  reached = cli_losses(workdir)[-1][0]
  committed = max(int(p) for p in steps_on_disk(workdir) if p.isdigit())
  assert reached - 2 <= committed <= reached, (reached, committed)
  ckpt_lib.verify(str(workdir / 'checkpoints' / str(committed)))  # Intact (or without checksums).
