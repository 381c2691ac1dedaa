"""The checkable task of the tiny pipeline: held-out generated questions with exact answers.

    python -m train.posttrain.task_eval --run pretrain=/tmp/tiny/pretrain --run sft=/tmp/tiny/sft \\
        --run ppo=/tmp/tiny/ppo [--reward_model /tmp/tiny/rm] [--config experiments/tiny_dense.py]
        [--num 256] [--out results.json]

Questions are data/corpus.py `instructions` past the training examples (`data.embedded_examples`):
sums, differences, products, capitals, opposites, counting; all but sums and differences come from
small sets the training examples cover (what SFT learned), and `novel` is the share not among them.
Each is a chat user turn answered greedily, correct by rewards.embedded_correct; `--reward_model`
adds the replies' mean RM score. A run's model config: its config.json, else `--config`.
"""

import argparse
import json
import re
import sys

import numpy as np

from data import corpus
from model import decode
from model.config import ConfigError
from train import compilation_cache
from train import generate as gen_lib
from train import workdir as workdir_lib
from train.posttrain import reward, rewards

KINDS = (('plus', re.compile(r'What is \d+ \+ \d+\?')), ('minus', re.compile(r'What is \d+ - \d+\?')),
         ('times', re.compile(r'What is \d+ times \d+\?')), ('capital', re.compile('capital')),
         ('opposite', re.compile('opposite')), ('count', re.compile('Count from')))


def questions(seed: int, num_train: int, num: int) -> list[dict]:
  """Held-out instruction pairs [num_train, num_train + num); `novel`: not a training question."""
  rows = corpus.instructions(seed, num_train + num)
  seen = {q['prompt'] for q in rows[:num_train]}
  return [dict(q, novel=q['prompt'] not in seen) for q in rows[num_train:]]


def per_kind(values: list, questions: list[str]) -> dict:
  kinds = [next(k for k, pattern in KINDS if pattern.search(q)) for q in questions]
  return {k: float(np.mean([v for v, kk in zip(values, kinds) if kk == k]))
          for k, _ in KINDS if k in kinds}


def pair_accuracy(scorer, seed: int, num_train: int, num: int) -> dict:
  """The reward model's accuracy on held-out corpus preference pairs, overall and per kind."""
  rows = corpus.preferences(seed, num_train + num)[num_train:]
  chats = [[{'role': 'user', 'content': r['prompt']}, {'role': 'assistant', 'content': r[side]}]
           for side in ('chosen', 'rejected') for r in rows]
  scores = scorer.messages(chats)
  right = list(scores[:num] > scores[num:])
  return {'accuracy': float(np.mean(right)), 'count': num,
          'per_kind': per_kind(right, [r['prompt'] for r in rows])}


def evaluate(generator, items: list[dict], *, max_new_tokens: int = 40, scorer=None) -> dict:
  """Accuracy (overall and per kind) of greedy chat replies; `scorer(rollout) -> [b]` rewards."""
  prompts = generator.prompt_ids([q['prompt'] for q in items], chat=True)
  out = generator.generate_ids(prompts, max_new_tokens=max_new_tokens, sampling=decode.Sampling(),
                               stop_ids=generator.stop_ids(True))
  replies = [out.completion_ids(j) for j in range(len(items))]
  correct = [rewards.embedded_correct(generator.tokenizer.decode(r), q['answer'])
             for r, q in zip(replies, items)]
  novel = [bool(q.get('novel', True)) for q in items]
  result = {'accuracy': float(np.mean(correct)), 'count': len(items),
            'per_kind': per_kind(correct, [q['prompt'] for q in items]),
            'mean_length': float(np.mean([len(r) for r in replies])),
            'novel': float(np.mean(novel))}
  if any(novel):
    result['novel_accuracy'] = float(np.mean([c for c, n in zip(correct, novel) if n]))
  if scorer is not None:
    result['reward'] = float(np.mean(scorer(out)))
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m train.posttrain.task_eval', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--run', action='append', required=True, help='NAME=WORKDIR, repeatable')
  parser.add_argument('--config', default='', help='model config of runs without config.json')
  for flag, default in (('reward_model', ''), ('num', 256), ('max_new_tokens', 40), ('out', '')):
    parser.add_argument(f'--{flag}', type=type(default), default=default)
  args = parser.parse_args(argv)
  compilation_cache.enable()
  results = {}
  try:
    for spec in args.run:
      name, _, path = spec.partition('=')
      run = workdir_lib.load_run(path, fallback=args.config or None)
      gen = gen_lib.Generator.of(run, max_batch=64)
      scorer = (reward.RewardScorer(args.reward_model, run.tokenizer, gen.placement)
                if args.reward_model else None)
      seed, num_train = int(run.config.data.embedded_seed), int(run.config.data.embedded_examples)
      items = questions(seed, num_train, args.num)
      results[name] = evaluate(gen, items, max_new_tokens=args.max_new_tokens, scorer=scorer)
      print(f'{name}: {json.dumps(results[name])}', flush=True)
    if scorer is not None:  # The same reward model for every run: reported with each.
      pairs = pair_accuracy(scorer, seed, num_train, args.num)
      print(f'reward model pairs: {json.dumps(pairs)}', flush=True)
      for r in results.values():
        r['reward_model_pairs'] = pairs
  except (ConfigError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(format_table(results))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=1)
  return 0


def format_table(results: dict) -> str:
  kinds = [k for k, _ in KINDS]
  head = ['run', 'accuracy', 'novel'] + kinds + ['reward', 'length']
  rows = [head]
  for name, r in results.items():
    novel = f'{100 * r["novel_accuracy"]:.1f}%' if 'novel_accuracy' in r else '-'
    rows.append([name, f'{100 * r["accuracy"]:.1f}%', novel] +
                [f'{100 * r["per_kind"][k]:.0f}%' if k in r['per_kind'] else '-' for k in kinds] +
                [f'{r["reward"]:.3f}' if 'reward' in r else '-', f'{r["mean_length"]:.1f}'])
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  return '\n'.join(' | '.join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


if __name__ == '__main__':
  sys.exit(main())
