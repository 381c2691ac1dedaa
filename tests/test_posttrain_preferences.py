"""On-policy preferences (train/posttrain/preferences.py): pairs sampled from a tiny SFT policy,
rated by the embedded checker, a test-module function or a reward model, then trained on by the
reward model and DPO."""

import json

import ml_collections
import numpy as np
import pytest

from data import chat, corpus, sources
from data.config import source_entry
from model import decode
from tests.util import stage_config
from train import generate as gen_lib
from train.posttrain import ppo_loop, preferences, rewards
from train.posttrain.__main__ import run as run_stage

SFT_STEPS = 150  # Enough for the tiny policy to answer some capitals and opposites right.
SAMPLE = ['--num_prompts', '32', '--samples', '8', '--max_new_tokens', '8']


def longest(prompt: str, reply: str, reference: str) -> float:
  """A user's rater (module:function): longer replies are better."""
  del prompt, reference
  return float(len(reply))


@pytest.fixture(scope='module')
def sft(tmp_path_factory) -> str:
  """A pretrain (2 steps) -> SFT chain; the SFT workdir."""
  w = tmp_path_factory.mktemp('chain')
  run_stage(stage_config('tiny_dense'), str(w / 'pretrain'))
  c = stage_config('tiny_sft', init_from=str(w / 'pretrain'), steps=SFT_STEPS,
                   ckpt_every=SFT_STEPS, log_every=50, global_batch=16)
  c.optim.peak_lr = 5e-3
  run_stage(c, str(w / 'sft'))
  return str(w / 'sft')


def _pairs(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def _onpolicy(config, path, eval_fraction=0.25):
  config.data.sources = ml_collections.ConfigDict(
      {'onpolicy': source_entry('jsonl', 'preference', path=str(path), eval_fraction=eval_fraction)})
  config.data.source = 'onpolicy'
  return config


def test_embedded_pairs_are_policy_samples_and_train_rm_and_dpo(sft, tmp_path, capsys):
  out = tmp_path / 'pairs.jsonl'
  assert preferences.main(['--policy', sft, '--out', str(out), '--rater', 'embedded'] + SAMPLE) == 0
  summary = capsys.readouterr().out.strip().splitlines()[-1]
  pairs = _pairs(out)
  assert len(pairs) >= 4, summary
  assert summary.startswith(f'preferences: 32 prompts, {len(pairs)} pairs written')
  assert f'{32 - len(pairs)} ties skipped' in summary and summary.endswith(f'step {SFT_STEPS}')
  answers = {q['prompt']: q['answer'] for q in corpus.instructions(0, 200)}
  for p in pairs:  # The checker itself agrees: chosen right, rejected wrong.
    assert rewards.embedded_correct(p['chosen'], answers[p['prompt']])
    assert not rewards.embedded_correct(p['rejected'], answers[p['prompt']])
    assert p['scores'] == [1.0, 0.0] and p['policy_step'] == SFT_STEPS
    assert p['policy'] == sft and p['rater'] == 'embedded' and p['chosen'] != p['rejected']

  # --all_pairs on the same samples: every right reply against every wrong one, best vs worst's
  # pair among them, the same prompts tied.
  every = tmp_path / 'every.jsonl'
  assert preferences.main(['--policy', sft, '--out', str(every), '--rater', 'embedded',
                           '--all_pairs'] + SAMPLE) == 0
  all_pairs = _pairs(every)
  every_summary = capsys.readouterr().out.strip().splitlines()[-1]
  assert f'{len(all_pairs)} pairs written' in every_summary
  assert f'{32 - len(pairs)} ties skipped' in every_summary
  keys = lambda ps: {(p['prompt'], p['chosen'], p['rejected']) for p in ps}
  assert keys(pairs) <= keys(all_pairs) and len(all_pairs) > len(pairs)
  assert {p['prompt'] for p in all_pairs} == {p['prompt'] for p in pairs}
  assert all(p['scores'] == [1.0, 0.0] for p in all_pairs)

  # The replies are the policy's samples: the engine, called on its own with the same prompts
  # (each 8 times in a row), seed and temperature, gives them.
  gen = gen_lib.Generator.from_checkpoint(sft, max_batch=64)
  config = ml_collections.ConfigDict({'data': stage_config('tiny_sft').data.to_dict(),
                                      'ppo': {'max_prompt_len': 64}})
  prompts = ppo_loop.load_prompts(config, chat.ChatTemplate(gen.tokenizer), 'train', sft)[:32]
  roll = gen.generate_ids([ids for ids, _, _ in prompts for _ in range(8)], max_new_tokens=8,
                          sampling=decode.Sampling(temperature=1.0), seed=0,
                          stop_ids=gen.stop_ids(True))
  samples = {}
  for i in range(len(prompts) * 8):
    samples.setdefault(prompts[i // 8][1], []).append(gen.tokenizer.decode(roll.completion_ids(i)))
  for p in pairs:
    assert p['chosen'] in samples[p['prompt']] and p['rejected'] in samples[p['prompt']]

  # The extra keys do not trouble the reader: every record is a pair of one user turn.
  data = _onpolicy(stage_config('tiny_rm'), out, eval_fraction=0.0).data
  [src] = sources.build_all(data, 'train', str(tmp_path))
  assert src.stats['records'] == len(pairs) and not src.stats['bad_input']
  assert [(c[0]['content'], c[1]['content'], r[1]['content']) for _, c, r in src.items] == [
      (p['prompt'], p['chosen'], p['rejected']) for p in pairs]

  # The reward model and DPO train on them (2 steps each).
  for name in ('tiny_rm', 'tiny_dpo'):
    config = _onpolicy(stage_config(name, init_from=sft), out)
    config[name[5:]].eval_batches = 1
    result = run_stage(config, str(tmp_path / name))
    assert result.history[-2]['step'] == 2 and np.isfinite(result.history[-2]['loss'])
    with open(tmp_path / name / 'checkpoints' / '2' / 'data' / 'metadata') as f:  # Data state.
      [state] = json.load(f)['process_states']
    assert state['signature']['source'] == 'onpolicy'
    built = state['counts']['built']['onpolicy']
    assert built['records'] == len(pairs) and built['too_long'] == 0 and built['items'] > 0

  # A reward model rates too (rm:WORKDIR): its own scores, chosen above rejected.
  rm_out = tmp_path / 'rm_pairs.jsonl'
  assert preferences.main(['--policy', sft, '--out', str(rm_out), '--rater',
                           f'rm:{tmp_path / "tiny_rm"}', '--num_prompts', '4']) == 0
  rm_pairs = _pairs(rm_out)
  assert rm_pairs and all(p['scores'][0] > p['scores'][1] for p in rm_pairs)


def test_module_rater(sft, tmp_path, capsys):
  out = tmp_path / 'pairs.jsonl'
  rater = f'{__name__}:longest'
  assert preferences.main(['--policy', sft, '--out', str(out), '--rater', rater, '--num_prompts',
                           '8', '--samples', '4', '--max_new_tokens', '8', '--seed', '3']) == 0
  pairs = _pairs(out)
  assert pairs and capsys.readouterr().out.strip().endswith(f'policy step {SFT_STEPS}')
  for p in pairs:
    assert p['rater'] == rater and p['scores'] == [len(p['chosen']), len(p['rejected'])]
    assert len(p['chosen']) > len(p['rejected'])


def test_best_and_worst_drops_blank_and_repeated_replies():
  assert preferences.best_and_worst(['a', 'bb', 'a', 'c'], [1, 2, 5, 1]) == [
      {'chosen': 'bb', 'rejected': 'a', 'scores': [2.0, 1.0]}]  # The first 'a' counts, not 5.
  assert preferences.best_and_worst(['a', 'a', ' '], [0, 1, 9]) == []  # One distinct reply.
  assert preferences.best_and_worst(['a', 'b'], [1, 1]) == []
  # --all_pairs: every two distinct replies with different scores, the higher chosen.
  assert preferences.every_pair(['a', 'bb', 'a', 'c', ' ', 'd'], [1, 2, 5, 1, 9, 0]) == [
      {'chosen': 'bb', 'rejected': 'a', 'scores': [2.0, 1.0]},
      {'chosen': 'a', 'rejected': 'd', 'scores': [1.0, 0.0]},
      {'chosen': 'bb', 'rejected': 'c', 'scores': [2.0, 1.0]},
      {'chosen': 'bb', 'rejected': 'd', 'scores': [2.0, 0.0]},
      {'chosen': 'c', 'rejected': 'd', 'scores': [1.0, 0.0]}]
  assert preferences.every_pair(['a', 'b', 'a'], [1, 1, 0]) == []


@pytest.mark.parametrize('args,message', [
    (['--policy', '/nonexistent/run'], 'error: --policy /nonexistent/run: no such run directory'),
    (['--rater', 'rm:/nonexistent/rm'], 'error: --rater rm:/nonexistent/rm: no such run directory'),
    (['--rater', 'nonsense'], "error: --rater='nonsense': use one of"),
    (['--rater', 'no_such_module:f'], "error: --rater='no_such_module:f': No module named"),
    (['--samples', '1'], 'error: --samples=1 (a pair needs >= 2)'),
    (['--max_prompt_len', '2'], 'error: no train prompt fits ppo.max_prompt_len=2'),
])
def test_bad_input_is_one_error_line(sft, tmp_path, capsys, args, message):
  argv = ['--policy', sft, '--out', str(tmp_path / 'p.jsonl')] + args
  assert preferences.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(message) and len(err.splitlines()) == 1, err
  assert not (tmp_path / 'p.jsonl').exists()
