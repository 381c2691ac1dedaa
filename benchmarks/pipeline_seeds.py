"""Mean and spread over seeds of the tiny post-training pipeline's held-out results.

    for s in 0 1 2; do SEED=$s scripts/tiny_pipeline.sh /tmp/seeds/s$s; done
    python benchmarks/pipeline_seeds.py /tmp/seeds/s0 /tmp/seeds/s1 /tmp/seeds/s2 [--out FILE]

Reads each WORKDIR/results.json (train/posttrain/task_eval.py) and prints a markdown table per
run: accuracy, novel accuracy and each task family as mean, with the spread (min-max) over the
seeds; then the reward model's held-out pair accuracy per family, and each run's difference
from SFT per seed.
"""

import argparse
import json
import pathlib

import numpy as np

KINDS = ('plus', 'minus', 'times', 'capital', 'opposite', 'count')


def cell(values) -> str:
  v = 100 * np.asarray(values, float)
  return f'{v.mean():.1f} ({v.min():.1f}-{v.max():.1f})'


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('workdirs', nargs='+')
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  seeds = [json.loads((pathlib.Path(w) / 'results.json').read_text()) for w in args.workdirs]
  runs = list(seeds[0])
  lines = [f'{len(seeds)} seeds; % correct, mean (min-max)', '',
           '| run | accuracy | novel | ' + ' | '.join(KINDS) + ' |',
           '|---' * (3 + len(KINDS)) + '|']
  for run in runs:
    rs = [s[run] for s in seeds]
    lines.append(f'| {run} | {cell([r["accuracy"] for r in rs])} | '
                 f'{cell([r.get("novel_accuracy", 0) for r in rs])} | ' +
                 ' | '.join(cell([r['per_kind'].get(k, 0) for r in rs]) for k in KINDS) + ' |')
  lines += ['', 'Accuracy minus SFT, per seed (points):', '']
  for run in runs:
    diffs = [100 * (s[run]['accuracy'] - s['sft']['accuracy']) for s in seeds]
    lines.append(f'- {run}: ' + ', '.join(f'{d:+.1f}' for d in diffs) +
                 f' (mean {np.mean(diffs):+.1f})')
  pairs = [s[runs[0]]['reward_model_pairs'] for s in seeds if 'reward_model_pairs' in s[runs[0]]]
  if pairs:
    lines += ['', "Reward model's held-out pair accuracy (right vs plausible wrong answer):", '',
              '| all | ' + ' | '.join(KINDS) + ' |', '|---' * (1 + len(KINDS)) + '|',
              f'| {cell([p["accuracy"] for p in pairs])} | ' +
              ' | '.join(cell([p['per_kind'].get(k, 0) for p in pairs]) for k in KINDS) + ' |']
  text = '\n'.join(lines)
  print(text)
  if args.out:
    pathlib.Path(args.out).write_text(text + '\n')


if __name__ == '__main__':
  main()
