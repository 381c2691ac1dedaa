"""The post-training stages keep the train loop's promises (they run through it): resume is
bit-identical, train.nan_policy stops naming the step or counts the skipped update, the data
state is saved gathered over processes, and through the CLI SIGTERM saves and exits 0 and a
kill -9 followed by the same command ends where an uninterrupted run does."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from model.config import ConfigError
from model.heads import ScalarModel
from train import distributed, loop
from train import workdir as workdir_lib
from train.posttrain.__main__ import run as run_stage

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=512, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
DATA = dict(seq_len=64, tokenizer_docs=300, embedded_docs=400, embedded_examples=200,
            embedded_eval_docs=40)


def _config(name: str, **train):
  import importlib
  c = importlib.import_module(f'experiments.{name}').get_config()
  c.model.update(SMALL)
  c.data.update(DATA)
  c.optim.update(warmup_steps=1)
  c.train.update({**dict(steps=4, log_every=1, ckpt_every=2, eval_batches=1, global_batch=8,
                         progress=False), **train})
  for section in ('rm', 'dpo'):
    if section in c:
      c[section].eval_batches = 1
  return c


@pytest.fixture(scope='module')
def lm_run(tmp_path_factory):
  """A 1-step LM run: the init_from of the stages (its cached tokenizer too)."""
  workdir = tmp_path_factory.mktemp('lm')
  run_stage(_config('tiny_dense', steps=1, ckpt_every=1), str(workdir))
  return str(workdir)


def _stage_config(stage: str, lm_run: str, **train):
  c = _config(f'tiny_{stage}', init_from=lm_run, **train)
  if stage == 'dpo':
    c.dpo.precompute_ref = True  # The reference pass over the remaining batches, also on resume.
  return c


def _losses(result):
  return {h['step']: h['loss'] for h in result.history if 'loss' in h}


@pytest.mark.parametrize('stage', ['rm', 'dpo'])
def test_stage_resume_is_bit_identical(tmp_path, lm_run, stage):
  straight = run_stage(_stage_config(stage, lm_run), str(tmp_path / 'a'))
  first = run_stage(_stage_config(stage, lm_run), str(tmp_path / 'b'), stop_after=2)
  assert int(first.state['step']) == 2
  resumed = run_stage(_stage_config(stage, lm_run), str(tmp_path / 'b'))
  a, b = _losses(straight), _losses(resumed)
  assert sorted(b) == [3, 4] and [a[s] for s in (3, 4)] == [b[s] for s in (3, 4)]
  assert straight.eval == resumed.eval and straight.eval
  for x, y in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The data state is saved gathered over processes, as the LM loop saves it.
  saved = json.loads((tmp_path / 'b/checkpoints/4/data/metadata').read_text())
  assert saved['format'] == distributed.STATE_FORMAT and len(saved['process_states']) == 1


@pytest.mark.parametrize('stage', ['rm', 'dpo'])
def test_stage_nan_policy(tmp_path, lm_run, stage):
  def diverging(policy):
    c = _stage_config(stage, lm_run, steps=3, nan_policy=policy)
    c.optim.update(peak_lr=1e30, warmup_steps=1, clip_norm=0.0)
    return c
  with pytest.raises(loop.NonFiniteError, match=r'step \d+: non-finite'):
    run_stage(diverging('stop'), str(tmp_path / 'stop'))
  result = run_stage(diverging('skip'), str(tmp_path / 'skip'))
  assert max(h.get('skipped_steps', 0) for h in result.history) >= 1
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result.state['params']))


def _cli(stage: str, lm_run: str, workdir, steps: int):
  return [sys.executable, '-m', 'train.posttrain', '--config', str(REPO / f'experiments/tiny_{stage}.py'),
          '--workdir', str(workdir), f'--config.train.init_from={lm_run}',
          f'--config.train.steps={steps}', '--config.train.ckpt_every=2',
          '--config.train.log_every=1', '--config.train.global_batch=8',
          '--config.train.progress=False', '--config.optim.warmup_steps=1',
          f'--config.{stage}.eval_batches=1',
          *(f'--config.model.{k}={v}' for k, v in SMALL.items()),
          *(f'--config.data.{k}={v}' for k, v in DATA.items())]


def _start(cmd):
  return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))


def _wait_for_checkpoint(proc, workdir, step: int, timeout: float = 600):
  """Waits until checkpoints/<step> (or a later one) is complete."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    steps = [int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit()] \
        if (workdir / 'checkpoints').is_dir() else []
    if steps and max(steps) >= step:
      return max(steps)
    assert proc.poll() is None, f'the run ended early:\n{proc.stdout.read()[-3000:]}'
    time.sleep(0.2)
  raise TimeoutError(f'no checkpoint {step} in {workdir}')


def test_stage_sigterm_and_kill_through_the_cli(tmp_path, lm_run):
  """rm: SIGTERM saves and exits 0; after a resume, kill -9; the same command again finishes
  with the losses and params of an uninterrupted run."""
  steps = 40
  cmd = lambda w: _cli('rm', lm_run, w, steps)
  w = tmp_path / 'killed'
  proc = _start(cmd(w))
  _wait_for_checkpoint(proc, w, 2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert 'stop requested: saved a checkpoint at step' in out
  stopped = workdir_lib.latest_step(str(w / 'checkpoints'))
  assert 2 <= stopped < steps

  proc = _start(cmd(w))
  _wait_for_checkpoint(proc, w, stopped + 2)
  proc.kill()  # SIGKILL: no handler runs, a checkpoint may be half written.
  proc.communicate(timeout=60)
  done = subprocess.run(cmd(w), cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  straight = subprocess.run(cmd(tmp_path / 'straight'), cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=600)
  assert straight.returncode == 0, straight.stderr[-3000:]

  def metrics(workdir):  # The last value logged for each step (a re-run step logs again).
    rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    return {r['step']: r['loss'] for r in rows if 'loss' in r and 'rm/accuracy' in r}
  a, b = metrics(tmp_path / 'straight'), metrics(w)
  assert sorted(a) == sorted(b) == list(range(1, steps + 1)) and a == b
  ra, rb = (workdir_lib.load_run(str(d), model_cls=ScalarModel) for d in (tmp_path / 'straight', w))
  assert ra.step == rb.step == steps
  for x, y in zip(jax.tree.leaves(ra.params), jax.tree.leaves(rb.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module')
def rm_run(tmp_path_factory, lm_run):
  workdir = tmp_path_factory.mktemp('rm')
  run_stage(_stage_config('rm', lm_run, steps=1, ckpt_every=1), str(workdir))
  return str(workdir)


def _ppo_config(lm_run, rm_run, **train):
  c = _config('tiny_ppo', init_from=lm_run, **{'steps': 2, 'ckpt_every': 4, **train})
  c.ppo.update(reward_model=rm_run, max_new_tokens=4, num_minibatches=2, ppo_epochs=2,
               eval_prompts=4, max_prompt_len=32)
  return c


def test_ppo_resume_is_bit_identical(tmp_path, lm_run, rm_run):
  straight = run_stage(_ppo_config(lm_run, rm_run), str(tmp_path / 'a'))
  first = run_stage(_ppo_config(lm_run, rm_run), str(tmp_path / 'b'), stop_after=1)
  assert int(first.state['step']) == 4 and first.eval == {}  # Ends the iteration: 2 epochs x 2.
  resumed = run_stage(_ppo_config(lm_run, rm_run), str(tmp_path / 'b'))
  a, b = ({h['step']: h for h in r.history if 'loss' in h} for r in (straight, resumed))
  assert sorted(b) == [5, 6, 7, 8] and sorted(a) == list(range(1, 9))
  for step in b:
    for key in ('loss', 'objective/scores', 'objective/kl', 'objective/kl_coef',
                'policy/grad_norm', 'val/grad_norm'):
      assert a[step][key] == b[step][key], (step, key)
  assert straight.eval == resumed.eval and set(straight.eval) == {'eval/score_before', 'eval/score'}
  for x, y in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  saved = json.loads((tmp_path / 'b/checkpoints/8/data/metadata').read_text())
  assert saved['process_states'][0]['iteration'] == 2


def test_ppo_checkpoints_only_between_iterations(tmp_path, lm_run, rm_run):
  with pytest.raises(ConfigError, match=r'train.ckpt_every=2: PPO saves between iterations'):
    run_stage(_ppo_config(lm_run, rm_run, ckpt_every=2), str(tmp_path))


def test_ppo_nan_policy(tmp_path, lm_run, rm_run):
  def diverging(policy):
    c = _ppo_config(lm_run, rm_run, nan_policy=policy)
    c.optim.update(peak_lr=1e30, warmup_steps=1, clip_norm=0.0)
    c.ppo.critic_lr = 1e30
    return c
  with pytest.raises(loop.NonFiniteError, match=r'step \d+: non-finite'):
    run_stage(diverging('stop'), str(tmp_path / 'stop'))
  result = run_stage(diverging('skip'), str(tmp_path / 'skip'))
  assert result.history[-2]['skipped_steps'] >= 1
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result.state))
