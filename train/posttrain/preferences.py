"""On-policy preference pairs: replies sampled from a policy checkpoint, rated, best vs worst.

    python -m train.posttrain.preferences --policy DIR --out PAIRS.jsonl [--config EXPERIMENT]
        [--split train] [--num_prompts 0] [--samples 4] [--temperature 1.0] [--max_new_tokens 32]
        [--max_prompt_len 64] [--rater embedded|gsm8k|module:function|rm:RM_WORKDIR] [--seed 0]
        [--all_pairs]

Prompts: the first `--num_prompts` (0: all) of the SFT sources of `--config` (default: the policy
run's config.json), read as ppo_loop.load_prompts does, `--samples` replies each. Rater: a reward of
train/posttrain/rewards.py, or `rm:WORKDIR`, a reward-model run's score. Per prompt, blank replies
are dropped and identical ones count once (the first's score); the first highest-scoring is chosen,
the first lowest rejected (`--all_pairs`: every two distinct replies whose scores differ, the higher
chosen); a prompt whose replies all score the same is a tie and writes nothing. A line: the
preference record of data/chat.py, {'prompt': the last user turn, 'chosen', 'rejected'}, plus
'policy', 'policy_step', 'rater' and 'scores' ([chosen, rejected]), which the reader ignores.
"""

import argparse
import json
import os
import sys

import ml_collections
import numpy as np

from data.chat import ChatTemplate
from model import decode
from model.config import ConfigError
from train import compilation_cache
from train import generate as gen_lib
from train import workdir as workdir_lib
from train.posttrain import ppo_loop, reward, rewards


def distinct_rated(replies: list[str], scores) -> dict:
  """{reply: score} of one prompt's rated replies; blank ones dropped, a repeat scored as its
  first."""
  distinct = {}
  for text, score in zip(replies, scores):
    if text.strip():
      distinct.setdefault(text, float(score))
  return distinct


def best_and_worst(replies: list[str], scores) -> list[dict]:
  """[{'chosen', 'rejected', 'scores'}] of one prompt's rated replies; [] for a tie."""
  distinct = distinct_rated(replies, scores)
  if len(set(distinct.values())) < 2:
    return []
  chosen, rejected = max(distinct, key=distinct.get), min(distinct, key=distinct.get)
  return [{'chosen': chosen, 'rejected': rejected,
           'scores': [distinct[chosen], distinct[rejected]]}]


def every_pair(replies: list[str], scores) -> list[dict]:
  """Records of every two distinct replies whose scores differ, the higher chosen (InstructGPT's
  K-choose-2 comparisons), in the replies' order; [] for a tie."""
  rated = list(distinct_rated(replies, scores).items())
  return [{'chosen': a, 'rejected': b, 'scores': [sa, sb]} if sa > sb else
          {'chosen': b, 'rejected': a, 'scores': [sb, sa]}
          for i, (a, sa) in enumerate(rated) for b, sb in rated[i + 1:] if sa != sb]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m train.posttrain.preferences', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--policy', required=True, help='checkpoint path of the policy run')
  parser.add_argument('--out', required=True)
  parser.add_argument('--split', default='train', choices=('train', 'eval'))
  for flag, default in (('config', ''), ('num_prompts', 0), ('samples', 4), ('temperature', 1.0),
                        ('max_new_tokens', 32), ('max_prompt_len', 64), ('rater', 'embedded'),
                        ('seed', 0)):
    parser.add_argument(f'--{flag}', type=type(default), default=default)
  parser.add_argument('--all_pairs', action='store_true', help='every pair, not best vs worst')
  args = parser.parse_args(argv)
  compilation_cache.enable()
  try:
    if args.samples < 2 or args.num_prompts < 0:
      raise ConfigError(f'--samples={args.samples} (a pair needs >= 2), --num_prompts='
                        f'{args.num_prompts} (>= 0; 0: all)')
    rm_dir = args.rater[3:] if args.rater.startswith('rm:') else None
    text_rater = None if rm_dir is not None else rewards.make(args.rater, '--rater')
    for flag, path in (('--policy ', args.policy), ('--rater rm:', rm_dir)):
      if path is not None and not os.path.isdir(path):
        raise FileNotFoundError(f'{flag}{path}: no such run directory')
    run = workdir_lib.load_run(args.policy, fallback=args.config or None)
    data = workdir_lib.load_config(args.config or run.config, run.workdir).data
    prompts = ppo_loop.load_prompts(
        ml_collections.ConfigDict({'data': data, 'ppo': {'max_prompt_len': args.max_prompt_len}}),
        ChatTemplate(run.tokenizer), args.split, run.workdir)[:args.num_prompts or None]
    gen = gen_lib.Generator.of(run, max_batch=64)
    scorer = reward.RewardScorer(rm_dir, run.tokenizer, gen.placement) if rm_dir else None
    k = args.samples
    out = gen.generate_ids([ids for ids, _, _ in prompts], samples=k,
                           sampling=decode.Sampling(temperature=args.temperature), seed=args.seed,
                           max_new_tokens=args.max_new_tokens, stop_ids=gen.stop_ids(chat=True))
    replies = [run.tokenizer.decode(out.completion_ids(i)) for i in range(len(prompts) * k)]
    scores = scorer(out) if scorer else [text_rater(prompts[i // k][1], r, prompts[i // k][2])
                                         for i, r in enumerate(replies)]
    meta = {'policy': os.path.abspath(args.policy), 'policy_step': run.step, 'rater': args.rater}
    pairs_of = every_pair if args.all_pairs else best_and_worst
    per_prompt = [pairs_of(replies[j * k:(j + 1) * k], scores[j * k:(j + 1) * k])
                  for j in range(len(prompts))]
    pairs = [{'prompt': text, **pair, **meta} for (_, text, _), prompt_pairs in
             zip(prompts, per_prompt) for pair in prompt_pairs]
    with open(args.out, 'w') as f:
      f.writelines(json.dumps(p) + '\n' for p in pairs)
  except (ConfigError, FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  ties = sum(not p for p in per_prompt)
  print(f'preferences: {len(prompts)} prompts, {len(pairs)} pairs written to {args.out}, '
        f'{ties} ties skipped, mean score {np.mean(scores):.4f} of '
        f'{len(replies)} samples, policy step {run.step}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
