"""The command line as users run it: the README's main command, overrides, SIGTERM, resume."""

import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
FAST = ['--config.train.steps=24', '--config.train.log_every=4', '--config.optim.warmup_steps=4',
        '--config.train.eval_batches=1', '--config.train.ckpt_every=12']


def readme_train_command() -> list[str]:
  """The `python -m train ...` part of the README's install-and-run command."""
  text = (REPO / 'README.md').read_text()
  found = re.search(r'python -m train --config experiments/tiny_dense\.py --workdir \S+', text)
  assert found, 'README.md lost its install-and-run command'
  return shlex.split(found.group(0))


def run_cli(args: list[str], workdir, **kw) -> subprocess.CompletedProcess:
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  return subprocess.run([sys.executable, *args[1:], '--workdir', str(workdir), *kw.pop('extra', [])],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, **kw)


def losses(workdir) -> dict[int, float]:
  rows = [json.loads(line) for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


def test_readme_command_trains_and_loss_falls(tmp_path):
  command = readme_train_command()
  i = command.index('--workdir')
  command = command[:i] + command[i + 2:]  # The test's own workdir instead.
  out = run_cli(command, tmp_path, extra=FAST)
  assert out.returncode == 0, out.stderr[-3000:]
  curve = losses(tmp_path)
  assert sorted(curve)[-1] == 24
  assert curve[24] < curve[4] - 0.5, curve  # Loss falls visibly within 24 steps.
  assert (tmp_path / 'checkpoints' / '24').is_dir()
  assert list((tmp_path / 'tb').glob('events.out.tfevents.*'))
  assert 'eval/loss' in (tmp_path / 'metrics.jsonl').read_text()


# `slow` (CI's budget): the pretrain case of tests/test_stages.py's
# test_stage_sigterm_and_kill_through_the_cli runs this command through SIGTERM, a resume and
# kill -9, and checks the finished run bit for bit against an uninterrupted one.
@pytest.mark.slow
def test_sigterm_saves_and_resume_continues(tmp_path):
  """SIGTERM mid-run: a checkpoint at the step reached, exit status 0; rerunning resumes there."""
  args = ['python', '-m', 'train', '--config', 'experiments/tiny_dense.py']
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  long_run = ['--config.train.steps=100000', '--config.train.log_every=1', '--config.optim.warmup_steps=2',
              '--config.train.ckpt_every=100000', '--config.train.eval_batches=1']
  proc = subprocess.Popen([sys.executable, *args[1:], '--workdir', str(tmp_path), *long_run], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / 'metrics.jsonl'
  deadline = time.time() + 500
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.5)
  assert proc.poll() is None, proc.communicate()[1][-3000:]
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  saved = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert len(saved) == 1 and saved[0] >= 3 and 'stop requested' in err
  stopped = saved[0]

  out = run_cli(args, tmp_path, extra=[f'--config.train.steps={stopped + 2}', '--config.train.log_every=1',
                                       '--config.optim.warmup_steps=2', '--config.train.eval_batches=1'])
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'resuming from step {stopped}' in out.stderr
  assert sorted(losses(tmp_path))[-1] == stopped + 2
