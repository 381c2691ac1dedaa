"""Every stage (pre-training, SFT, RM, DPO, PPO) keeps the train loop's promises (they run
through it): resume is bit-identical, train.nan_policy stops naming the step or counts the
skipped update, the data state is saved gathered over processes, and through the CLI SIGTERM
saves and exits 0 (also during start-up) and a kill -9 followed by the same command ends where
an uninterrupted run does, bit for bit."""

import ast
import functools
import importlib
import json
import os
import pathlib
import re
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
from train.posttrain import config as pt_config
from train.posttrain.__main__ import run as run_stage

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=512, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
DATA = dict(seq_len=64, tokenizer_docs=300, embedded_docs=400, embedded_examples=200,
            embedded_eval_docs=40)


def _config(name: str, **train):
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


@pytest.mark.parametrize('stage', ['sft', 'rm', 'dpo'])
def test_stage_nan_policy(tmp_path, lm_run, stage):
  def diverging(policy):
    c = _stage_config(stage, lm_run, steps=3, nan_policy=policy)
    c.optim.update(peak_lr=1e30, warmup_steps=1, clip_norm=0.0)
    return c
  _assert_stop_names_the_step(lambda: run_stage(diverging('stop'), str(tmp_path / 'stop')),
                              tmp_path / 'stop')
  result = run_stage(diverging('skip'), str(tmp_path / 'skip'))
  assert max(h.get('skipped_steps', 0) for h in result.history) >= 1
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result.state['params']))


@pytest.fixture(scope='module')
def rm_run(tmp_path_factory, lm_run):
  workdir = tmp_path_factory.mktemp('rm')
  run_stage(_stage_config('rm', lm_run, steps=1, ckpt_every=1), str(workdir))
  return str(workdir)


# Through the CLI, every stage: (module, experiment, keys of its own, loop steps per iteration).
CLI_STAGES = {
    'pretrain': ('train', 'tiny_dense', ['--config.train.eval_batches=1'], 1),
    'sft': ('train.posttrain', 'tiny_sft', ['--config.train.eval_batches=1'], 1),
    'rm': ('train.posttrain', 'tiny_rm', ['--config.rm.eval_batches=1'], 1),
    'dpo': ('train.posttrain', 'tiny_dpo', ['--config.dpo.eval_batches=1'], 1),
    'ppo': ('train.posttrain', 'tiny_ppo', ['--config.ppo.max_new_tokens=4',
                                            '--config.ppo.num_minibatches=2',
                                            '--config.ppo.ppo_epochs=2', '--config.ppo.eval_prompts=4',
                                            '--config.ppo.max_prompt_len=32'], 4),
}


def _assert_stop_names_the_step(run, workdir):
  """The step NonFiniteError names is the one step metrics.jsonl marks non-finite."""
  with pytest.raises(loop.NonFiniteError, match=r'step \d+: non-finite') as e:
    run()
  bad = [step for step, row in _metrics(workdir).items() if row.get('nonfinite') == 1]
  assert bad == [int(re.match(r'step (\d+):', str(e.value)).group(1))]


def _cli(stage: str, runs: dict, workdir, steps: int, *extra):
  """The command of `stage` for `steps` loop steps (PPO: steps / 4 iterations of 4 updates)."""
  module, experiment, own, per_iteration = CLI_STAGES[stage]
  return [sys.executable, '-m', module, '--config', str(REPO / f'experiments/{experiment}.py'),
          '--workdir', str(workdir), *_overrides(stage, runs, steps), *extra]


def _overrides(stage: str, runs: dict, steps: int) -> list[str]:
  _, _, own, per_iteration = CLI_STAGES[stage]
  return [f'--config.train.steps={steps // per_iteration}',
          f'--config.train.ckpt_every={2 * per_iteration}', '--config.train.log_every=1',
          '--config.train.global_batch=8', '--config.train.progress=False',
          '--config.optim.warmup_steps=1', '--config.hardware.peak_tflops=1.0', *own,
          *([f'--config.train.init_from={runs["lm"]}'] if stage != 'pretrain' else []),
          *([f'--config.ppo.reward_model={runs["rm"]}'] if stage == 'ppo' else []),
          *(f'--config.model.{k}={v}' for k, v in SMALL.items()),
          *(f'--config.data.{k}={v}' for k, v in DATA.items())]


def _in_process(stage: str, runs: dict, workdir, steps: int):
  """The run the CLI command of `stage` makes, in this process: its config from the same
  overrides (a literal where the text is one, else the string)."""
  c = importlib.import_module(f'experiments.{CLI_STAGES[stage][1]}').get_config()
  for arg in _overrides(stage, runs, steps):
    path, value = arg[len('--config.'):].split('=', 1)
    *parents, key = path.split('.')
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    functools.reduce(lambda d, k: d[k], parents, c)[key] = value
  return run_stage(c, str(workdir))


@pytest.fixture(scope='module')
def runs(lm_run, rm_run):
  return {'lm': lm_run, 'rm': rm_run}


def _start(cmd):
  return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))


def _finish(cmd):
  return subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=600)


def _wait_for(proc, path: pathlib.Path, timeout: float = 600):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and not path.exists():
    assert proc.poll() is None, f'the run ended early:\n{proc.stdout.read()[-3000:]}'
    time.sleep(0.1)
  assert path.exists(), f'no {path}'


def _wait_for_checkpoint(proc, workdir, step: int, timeout: float = 600):
  """Waits until checkpoints/<step> (or a later one) is complete."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    steps = [int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit()] \
        if (workdir / 'checkpoints').is_dir() else []
    if steps and max(steps) >= step:
      return max(steps)
    assert proc.poll() is None, f'the run ended early:\n{proc.stdout.read()[-3000:]}'
    time.sleep(0.1)
  raise TimeoutError(f'no checkpoint {step} in {workdir}')


def _metrics(workdir) -> dict:
  """step -> every metric logged at it but the timings (a step run again logs again: the last
  value counts)."""
  out = {}
  for line in (workdir / 'metrics.jsonl').read_text().splitlines():
    row = json.loads(line)
    out.setdefault(row.pop('step'), {}).update(
        {k: v for k, v in row.items() if not k.startswith('perf/')})
  return out


# SFT, RM and DPO are `slow` (CI's budget): the default run keeps the plain loop and PPO (the
# stage with a rollout hook); in-process resume and NaN tests cover SFT, RM and DPO there.
@pytest.mark.parametrize('stage', [pytest.param(s, marks=pytest.mark.slow)
                                   if s in ('sft', 'rm', 'dpo') else s for s in CLI_STAGES])
def test_stage_sigterm_and_kill_through_the_cli(tmp_path, runs, stage):
  """SIGTERM saves and exits 0; after a resume, kill -9; the same command again finishes with
  the metrics and params of an uninterrupted run, bit for bit."""
  steps, per_iteration = 16, CLI_STAGES[stage][3]
  w = tmp_path / 'killed'
  proc = _start(_cli(stage, runs, w, steps))
  _wait_for_checkpoint(proc, w, 2 * per_iteration)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert 'stop requested: saved a checkpoint at step' in out
  stopped = workdir_lib.latest_step(str(w / 'checkpoints'))
  assert 2 * per_iteration <= stopped < steps and stopped % per_iteration == 0

  proc = _start(_cli(stage, runs, w, steps))
  _wait_for_checkpoint(proc, w, stopped + 1)
  proc.kill()  # SIGKILL: no handler runs, a checkpoint may be half written.
  proc.communicate(timeout=60)
  done = _finish(_cli(stage, runs, w, steps))
  assert done.returncode == 0, done.stdout[-3000:]
  assert re.search(r'resuming from step \d+', done.stdout), done.stdout[-3000:]
  _in_process(stage, runs, tmp_path / 'straight', steps)  # The same config, never interrupted.

  a, b = _metrics(tmp_path / 'straight'), _metrics(w)
  assert sorted(a) == sorted(b) == list(range(1, steps + 1)) and a == b
  model_cls = ScalarModel if stage == 'rm' else None
  ra, rb = (workdir_lib.load_run(str(d), model_cls=model_cls) for d in (tmp_path / 'straight', w))
  assert ra.step == rb.step == steps
  for x, y in zip(jax.tree.leaves(ra.params), jax.tree.leaves(rb.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# Both CLIs (train.posttrain runs SFT, RM and DPO as it runs PPO); every stage in-process.
@pytest.mark.parametrize('stage', ['pretrain', 'ppo'])
def test_stage_nonfinite_stop_names_the_step_through_the_cli(tmp_path, runs, stage):
  """nan_policy=stop: exit status 1 and one line naming the step that metrics.jsonl marks
  non-finite (skip, which counts the dropped updates, is tested in-process per stage:
  test_stage_nan_policy, test_ppo_nan_policy, tests/test_loop.py)."""
  out = _finish(_cli(stage, runs, tmp_path, 4 * CLI_STAGES[stage][3], '--config.optim.peak_lr=1e30',
                     '--config.optim.clip_norm=0.0', *(['--config.ppo.critic_lr=1e30']
                                                       if stage == 'ppo' else [])))
  assert out.returncode == 1, out.stdout[-3000:]
  named = re.search(r'error: step (\d+): non-finite loss or gradient', out.stdout)
  assert named, out.stdout[-3000:]
  bad = [step for step, row in _metrics(tmp_path).items() if row.get('nonfinite') == 1]
  assert bad == [int(named.group(1))]
  assert 'Traceback' not in out.stdout


def test_sigterm_during_start_up_exits_cleanly(tmp_path):
  """SIGTERM before the first step: exit status 0, one line saying nothing was trained."""
  proc = _start(_cli('pretrain', {}, tmp_path, 40))
  _wait_for(proc, tmp_path / 'config.json')  # Written at the start of the run.
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert 'stop requested before the first step: nothing trained, nothing saved' in out
  saved = tmp_path / 'checkpoints'
  assert not (saved.exists() and [d for d in os.listdir(saved) if d.isdigit()])
  assert 'Traceback' not in out


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


def test_grpo_resume_is_bit_identical(tmp_path, lm_run):
  def config():
    c = _config('tiny_grpo', init_from=lm_run, steps=2, ckpt_every=4)
    c.ppo.update(max_new_tokens=4, eval_prompts=4, rollout_slots=8)
    c.grpo.update(num_generations=2, sampling_rounds=3)  # Dynamic sampling's state resumes too.
    return c
  straight = run_stage(config(), str(tmp_path / 'a'))
  first = run_stage(config(), str(tmp_path / 'b'), stop_after=1)
  assert int(first.state['step']) == 4
  resumed = run_stage(config(), str(tmp_path / 'b'))
  a, b = ({h['step']: h for h in r.history if 'loss' in h} for r in (straight, resumed))
  assert sorted(b) == [5, 6, 7, 8] and sorted(a) == list(range(1, 9))
  for step in b:
    for key in ('loss', 'loss/kl', 'objective/scores', 'objective/kl', 'grad_norm'):
      assert a[step][key] == b[step][key], (step, key)
  assert straight.eval == resumed.eval and set(straight.eval) == {'eval/score_before', 'eval/score'}
  assert set(straight.state) == {'step', 'params', 'opt_state', 'rng'}  # No critic.
  rounds = [h['objective/sampling_rounds'] for h in straight.history if h['step'] in (1, 5)]
  saved = json.loads((tmp_path / 'b/checkpoints/8/data/metadata').read_text())
  assert saved['process_states'][0]['cursor'] == 8 * sum(rounds)  # train.global_batch x rounds.
  for x, y in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_ppo_with_a_verifiable_reward(tmp_path, lm_run):
  """ppo.reward in place of a reward model: the checker's scores, a critic from the policy."""
  c = _ppo_config(lm_run, '', steps=1)
  c.ppo.update(reward='embedded', critic_init='policy', missing_eos_penalty=0.0)
  result = run_stage(c, str(tmp_path))
  first = result.history[0]
  assert 0 <= first['objective/scores'] <= 1 and np.isfinite(first['loss/value'])
  assert 0 <= result.eval['eval/score'] <= 1
  for reward_model, reward, match in (('', '', 'set one'), ('/x', 'embedded', 'set one')):
    c.ppo.update(reward_model=reward_model, reward=reward)
    with pytest.raises(ConfigError, match=f"ppo.reward_model='{reward_model}'.*{match}"):
      pt_config.validate(c, 8)
  c.ppo.update(reward_model='', reward='embedded', critic_init='reward_model')
  with pytest.raises(ConfigError, match='ppo.critic_init=reward_model: ppo.reward=.embedded. has'):
    pt_config.validate(c, 8)


def test_ppo_with_a_reward_model_ensemble(tmp_path, lm_run, rm_run):
  """ppo.reward_ensemble: the RM twice, worst case, is the RM standardised on the reference's
  greedy held-out replies (whose mean score is then 0); its errors. (Combining: test_posttrain.)"""
  c = _ppo_config(lm_run, rm_run, steps=1)
  c.ppo.update(reward_ensemble=rm_run, ensemble_combine='min', missing_eos_penalty=0.0)
  result = run_stage(c, str(tmp_path))
  assert result.eval['eval/score_before'] == pytest.approx(0.0, abs=1e-5)  # Calibrated there.
  assert np.isfinite(result.history[0]['loss/value'])
  c.ppo.ensemble_combine = 'max'
  with pytest.raises(ConfigError, match=r"ppo.ensemble_combine='max': use one of \('mean', 'min'\)"):
    pt_config.validate(c, 8)
  c.ppo.update(ensemble_combine='mean', reward_model='', reward='embedded', critic_init='policy')
  with pytest.raises(ConfigError, match=r'ppo.reward_ensemble=.*ppo.reward_model, which is not set'):
    pt_config.validate(c, 8)


def test_ppo_critic_warmup_holds_the_policy(tmp_path, lm_run):
  """ppo.critic_warmup=1: the first iteration's updates train the critic alone (the policy's lr 0,
  its params still the SFT checkpoint's); the policy trains from the second."""
  c = _ppo_config(lm_run, '', steps=2)
  c.ppo.update(reward='embedded', critic_init='policy', critic_warmup=1)
  c.optim.warmup_steps = 1
  first = run_stage(c, str(tmp_path), stop_after=1)
  lrs = [h['learning_rate'] for h in first.history if 'loss' in h]
  assert lrs == [0.0] * 4 and all(h['val/grad_norm'] > 0 for h in first.history if 'loss' in h)
  sft = workdir_lib.load_run(lm_run).params
  for x, y in zip(jax.tree.leaves(sft), jax.tree.leaves(first.state['params'])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  rest = run_stage(c, str(tmp_path))  # Resumes at the second iteration: the policy's warm-up.
  lrs = {h['step']: h['learning_rate'] for h in rest.history if 'loss' in h}
  assert lrs[5] == 0.0 and lrs[6] == pytest.approx(c.optim.peak_lr) and min(lrs[7], lrs[8]) > 0
  c.ppo.critic_warmup = 2
  with pytest.raises(ConfigError, match=r'ppo.critic_warmup=2 must be in \[0, train.steps=2\)'):
    pt_config.validate(c, 8)


def test_ppo_checkpoints_only_between_iterations(tmp_path, lm_run, rm_run):
  with pytest.raises(ConfigError, match=r'train.ckpt_every=2: PPO saves between iterations'):
    run_stage(_ppo_config(lm_run, rm_run, ckpt_every=2), str(tmp_path))
  with pytest.raises(ConfigError, match=r'distributed.num_processes=2: PPO runs on one process'):
    pt_config.validate(_ppo_config(lm_run, rm_run), 8, process_count=2)


def test_ppo_nan_policy(tmp_path, lm_run, rm_run):
  def diverging(policy):
    c = _ppo_config(lm_run, rm_run, nan_policy=policy)
    c.optim.update(peak_lr=1e30, warmup_steps=1, clip_norm=0.0)
    c.ppo.critic_lr = 1e30
    return c
  _assert_stop_names_the_step(lambda: run_stage(diverging('stop'), str(tmp_path / 'stop')),
                              tmp_path / 'stop')
  result = run_stage(diverging('skip'), str(tmp_path / 'skip'))
  assert result.history[-2]['skipped_steps'] >= 1
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result.state))
