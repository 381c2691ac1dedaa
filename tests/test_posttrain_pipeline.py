"""The tiny pipeline end to end: pre-train -> SFT -> reward model -> PPO, DPO, GRPO -> task eval.

The fast variant runs every stage for two steps on a very small model through the same entry
point as the CLI (train.posttrain.__main__.run), each stage loading the previous checkpoint,
and checks what each stage leaves behind. The slow variant runs scripts/tiny_pipeline.sh with
few steps.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests.util import SMALL
from tests.util import stage_config as _config
from train import workdir as workdir_lib
from train.posttrain import task_eval
from train.posttrain.__main__ import run as run_stage

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_tiny_pipeline_few_steps(tmp_path):
  w = tmp_path
  pre = run_stage(_config('tiny_dense'), str(w / 'pretrain'))
  assert pre.history[-1]['step'] == 2 and (w / 'pretrain' / 'config.json').is_file()
  tokenizer = workdir_lib.cached_tokenizer(str(w / 'pretrain'))
  sft_cfg = _config('tiny_sft', init_from=str(w / 'pretrain'))
  sft = run_stage(sft_cfg, str(w / 'sft'))
  assert workdir_lib.load_config(None, str(w / 'sft')).data.tokenizer == tokenizer
  assert np.isfinite([h for h in sft.history if 'loss' in h][-1]['loss'])
  rm_cfg = _config('tiny_rm', init_from=str(w / 'sft'))
  rm_cfg.rm.eval_batches = 1
  rm = run_stage(rm_cfg, str(w / 'rm'))
  assert {'eval/rm/accuracy', 'eval/rm/margin', 'eval/rm/chosen', 'eval/rm/rejected'} <= set(rm.eval)
  assert {'rm/accuracy', 'rm/margin', 'loss'} <= set(rm.history[-2])
  ppo_cfg = _config('tiny_ppo', init_from=str(w / 'sft'), ckpt_every=4)  # Updates: 2 epochs x 2.
  ppo_cfg.ppo.update(reward_model=str(w / 'rm'), max_new_tokens=4, num_minibatches=2,
                     ppo_epochs=2, eval_prompts=4, max_prompt_len=32, ref_on_host=True,
                     kl_estimator='k3', adaptive_kl=True)
  ppo = run_stage(ppo_cfg, str(w / 'ppo'))
  last = ppo.history[-2]
  for key in ('objective/kl', 'objective/rlhf_reward', 'objective/entropy', 'policy/clipfrac',
              'policy/approxkl', 'val/clipfrac', 'loss/value', 'completions/mean_length'):
    assert np.isfinite(last[key]), key
  # Rows cut at max_new_tokens=4 have exactly 4 new tokens, the others at most 4; a mean over
  # the rollouts of whole token counts.
  mean_len, truncated = last['completions/mean_length'], last['completions/truncated_fraction']
  assert 4 * truncated <= mean_len <= 4
  assert float(mean_len * ppo_cfg.train.global_batch).is_integer()
  dpo_cfg = _config('tiny_dpo', init_from=str(w / 'sft'))
  dpo_cfg.dpo.update(eval_batches=1, precompute_ref=True)
  dpo = run_stage(dpo_cfg, str(w / 'dpo'))
  assert {'eval/rewards/accuracy', 'eval/rewards/margin'} <= set(dpo.eval)
  grpo_cfg = _config('tiny_grpo', init_from=str(w / 'sft'), ckpt_every=4)
  grpo_cfg.ppo.update(max_new_tokens=4, eval_prompts=4, rollout_slots=12)
  grpo_cfg.grpo.num_generations = 4
  grpo = run_stage(grpo_cfg, str(w / 'grpo'))
  last = grpo.history[-2]
  for key in ('objective/kl', 'objective/scores', 'objective/zero_std_fraction', 'loss/kl',
              'policy/clipfrac', 'loss/policy'):
    assert np.isfinite(last[key]), key
  assert 0 <= grpo.eval['eval/score'] <= 1 and 0 <= last['objective/scores'] <= 1
  # Every stage's workdir is an LM checkpoint the generic tools read (PPO and DPO: policies).
  for stage in ('pretrain', 'sft', 'ppo', 'dpo', 'grpo'):
    run = workdir_lib.load_run(str(w / stage))  # RL steps are updates: 2 iterations x 4.
    assert run.step == (8 if stage in ('ppo', 'grpo') else 2) and run.tokenizer.path == tokenizer
  out = w / 'results.json'
  assert task_eval.main(['--run', f'sft={w / "sft"}', '--run', f'ppo={w / "ppo"}', '--num', '8',
                         '--max_new_tokens', '4', '--reward_model', str(w / 'rm'),
                         '--out', str(out)]) == 0
  results = json.loads(out.read_text())
  assert set(results) == {'sft', 'ppo'} and results['ppo']['count'] == 8
  assert 0 <= results['ppo']['accuracy'] <= 1 and np.isfinite(results['ppo']['reward'])


@pytest.mark.slow
def test_tiny_pipeline_script(tmp_path):
  flags = ' '.join(f'--config.model.{k}={v}' for k, v in SMALL.items()) + (
      ' --config.optim.warmup_steps=1 --config.train.global_batch=8 --config.data.seq_len=128'
      ' --config.train.progress=False')
  env = dict(os.environ, PYTHON=sys.executable, COMMON=flags, PRETRAIN_STEPS='3', SFT_STEPS='3',
             RM_STEPS='3', PPO_STEPS='2', DPO_STEPS='3', GRPO_STEPS='2', EVAL_NUM='8',
             # A 3-step SFT model is never right: a rater by length still gives pairs.
             PAIR_PROMPTS='200', RATER='tests.test_posttrain_preferences:longest')
  proc = subprocess.run(['bash', str(REPO / 'scripts' / 'tiny_pipeline.sh'), str(tmp_path)],
                        env=env, capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / 'results.json').read_text())
  assert set(results) == {'pretrain', 'sft', 'ppo', 'dpo', 'grpo'}
  assert 'run      | accuracy' in proc.stdout
