"""Rollout throughput (generated tokens/s): continuous vs static batching at equal slots, on CPU.

Engines over the same prompts, slots and model, timed round by round in turn so that load from
other users of the machine hits all alike:
  baseline      the static generator before the rollout engine (git archive of --baseline,
                default a2d5c37: left-padded batches of `slots` prompts, one prefill, decode until
                every row stops), in a worker process;
  static        this tree's engine with admission only when every slot is free;
  continuous:R  this tree's engine (train/generate.py, model/decode.py) admitting R rows at a
                time (Generator(admit_rows=R); --admit lists the R to time);
  shared:R      the same with each prompt prefilled once for its samples (generate_ids(samples=G)),
                admitting max(1, R // G) whole groups at a time; only in the group workload.
Each worker compiles in a warm-up round, then runs one timed round per request of the parent.

Workloads: `distinct` (--prompts different prompts, one reply each) and, with --group G > 1,
`group` (--prompts // G prompts, G replies each: a GRPO or on-policy-preference rollout; the
static engines get each prompt repeated G times).

Prompts: the embedded SFT questions (data/corpus.py instructions) as chat user turns, tokenized
by a BPE tokenizer of the embedded corpus (experiments/tiny_dense.py's kind). Replies: EOS-driven
stops of temperature-1 sampling from a random-init model (near-uniform next tokens), with a stop
set of ids sized so that a step stops with probability 1 / (mean token length of the embedded
replies + end marker): geometric lengths of the tasks' mean, capped at --max_new_tokens.

  python benchmarks/bench_rollout.py --out benchmarks/results/rollout.md
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = {  # ModelConfig fields; both use the tiny tokenizer's vocabulary.
    'tiny (experiments/tiny_dense.py)': dict(d_model=128, num_layers=4, num_heads=4,
                                             num_kv_heads=4, mlp_dim=512, tie_embeddings=False),
    '~50M': dict(d_model=640, num_layers=8, num_heads=10, num_kv_heads=10, mlp_dim=2560,
                 tie_embeddings=False),
}


class StubTokenizer:
  """What the Generator reads of a tokenizer when given token ids and no stop strings."""
  pad_id, bos_id = 0, 1

  def __init__(self, eos_id):
    self.eos_id = eos_id

  def decode(self, ids):
    return ''


def worker(job: dict) -> None:
  """Reads one engine name per stdin line, answers {'tokens', 'seconds'} per line."""
  import jax
  from model.config import ModelConfig
  from model.decode import Sampling
  from train import generate as gen_lib
  from train import state as state_lib
  cfg = ModelConfig(vocab_size=job['vocab'], attention='xla', **job['model'])
  params = state_lib.init_params(cfg, jax.random.PRNGKey(0))
  tok, slots, g = StubTokenizer(job['stop_ids'][0]), job['slots'], job['group']
  gens = {}
  kw = dict(max_new_tokens=job['max_new_tokens'], sampling=Sampling(temperature=1.0),
            stop_ids=job['stop_ids'], seed=0)
  prompts = job['prompts'][:len(job['prompts']) // g]
  repeated = [x for x in prompts for _ in range(g)]

  def run(engine):
    kind, _, rows = engine.partition(':')
    if rows not in gens:  # The baseline tree's Generator has no admit_rows.
      gens[rows] = gen_lib.Generator(cfg, params, tok, max_batch=slots,
                                     **({'admit_rows': int(rows)} if rows else {}))
    gen = gens[rows]
    if kind == 'baseline':  # The old Generator.complete: `slots` prompts per batch.
      outs = [gen.generate_ids(repeated[i:i + slots], **kw)
              for i in range(0, len(repeated), slots)]
    elif kind == 'shared':
      outs = [gen.generate_ids(prompts, samples=g, **kw)]
    else:
      outs = [gen.generate_ids(repeated, static=kind == 'static', **kw)]
    return int(sum(o.num_new_b.sum() for o in outs))

  for line in sys.stdin:
    engine = line.strip()
    start = time.perf_counter()
    tokens = run(engine)
    print(json.dumps({'tokens': tokens, 'seconds': time.perf_counter() - start}), flush=True)


def prompts_and_stops(num_prompts: int, vocab: int):
  sys.path.insert(0, REPO)
  import numpy as np
  from data import corpus
  from data import tokenizer as tokenizer_lib
  from data.chat import ChatTemplate
  tok = tokenizer_lib.train(corpus.documents(seed=0, num_docs=2000), vocab, 'bpe',
                            os.path.join(tempfile.mkdtemp(), 'tok'))
  template = ChatTemplate(tok)
  items = corpus.instructions(seed=1, num=num_prompts)
  prompts = [template.encode([{'role': 'user', 'content': q['prompt']}], generation_prompt=True)[0]
             for q in items]
  mean_reply = float(np.mean([len(tok.encode(q['response'])) + 1 for q in items]))
  num_stop = max(1, round(tok.vocab_size / mean_reply))
  stop_ids = np.random.default_rng(0).choice(np.arange(3, tok.vocab_size), num_stop, replace=False)
  return [[int(t) for t in p] for p in prompts], [int(t) for t in stop_ids], mean_reply, tok


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--worker', default='', help='(internal) the job file of a worker')
  parser.add_argument('--prompts', type=int, default=64)
  parser.add_argument('--slots', type=int, default=16)
  parser.add_argument('--max_new_tokens', type=int, default=64)
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--models', default=','.join(MODELS))
  parser.add_argument('--baseline', default='a2d5c37', help='commit of the static generator')
  parser.add_argument('--admit', default='2,4,8', help='admit_rows values of the continuous engine')
  parser.add_argument('--group', type=int, default=8, help='samples per prompt (1: no group run)')
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  if args.worker:
    with open(args.worker) as f:
      worker(json.load(f))
    return 0
  base_tree = tempfile.mkdtemp(prefix='meshlm_baseline_')
  subprocess.run(f'git -C {REPO} archive {args.baseline} | tar -x -C {base_tree}', shell=True,
                 check=True)
  prompts, stop_ids, mean_reply, tok = prompts_and_stops(args.prompts, 2048)
  lengths = sorted(len(p) for p in prompts)
  admits = [int(r) for r in args.admit.split(',')]
  rows, started = [], time.time()
  for name in args.models.split(','):
    for g in sorted({1, args.group}):
      engines = ['baseline', 'static'] + [f'continuous:{r}' for r in admits]
      shared = {max(1, r // g) * g: r for r in admits}  # Admission rounds down to whole groups.
      engines += [f'shared:{r}' for r in shared.values()] if g > 1 else []
      job = dict(vocab=tok.vocab_size, model=MODELS[name], prompts=prompts, stop_ids=stop_ids,
                 slots=args.slots, max_new_tokens=args.max_new_tokens, group=g)
      job_file = os.path.join(tempfile.mkdtemp(), 'job.json')
      with open(job_file, 'w') as f:
        json.dump(job, f)
      workers = {tree: subprocess.Popen(
          [sys.executable, os.path.join(REPO, 'benchmarks', 'bench_rollout.py'), '--worker',
           job_file], cwd=tree, env={**os.environ, 'PYTHONPATH': tree}, stdin=subprocess.PIPE,
          stdout=subprocess.PIPE, text=True) for tree in (base_tree, REPO)}
      results = {e: [] for e in engines}
      for r in range(args.rounds + 1):  # Round 0 compiles.
        for engine in (engines if r % 2 else engines[::-1]):
          w = workers[base_tree if engine == 'baseline' else REPO]
          w.stdin.write(engine + '\n')
          w.stdin.flush()
          out = json.loads(w.stdout.readline())
          if r:
            results[engine].append(out['tokens'] / out['seconds'])
          print(name, g, engine, r, out, flush=True)
      for w in workers.values():
        w.stdin.close()
        w.wait()
      best = {e: max(v) for e, v in results.items()}
      workload = 'distinct' if g == 1 else f'group of {g}'
      rows += [f"| {name} | {workload} | {e} | {min(v):.0f}-{max(v):.0f} | "
               f"{best[e] / best['baseline']:.2f}x | {best[e] / best['static']:.2f}x |"
               for e, v in results.items()]
  load = subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
  report = '\n'.join([
      '# Rollout throughput: continuous vs static batching (CPU)', '',
      f'Machine: {platform.node()}, {os.cpu_count()} cores ({platform.processor() or "cpu"}), '
      f'one JAX CPU device. Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} '
      f'UTC, {time.time() - started:.0f} s.',
      f'Load (uptime, at the end): `{load}`.', '',
      'Command: `python benchmarks/bench_rollout.py ' + ' '.join(sys.argv[1:]) + '`', '',
      f'{args.prompts} embedded SFT prompts (chat template, {lengths[0]}-{lengths[-1]} tokens, '
      f'median {lengths[len(lengths) // 2]}); replies EOS-driven, geometric of mean '
      f'{mean_reply:.1f} tokens (the embedded replies\' mean, end marker included), cap '
      f'{args.max_new_tokens}; temperature 1; {args.slots} slots for every engine. The group '
      f'workload samples {args.group} replies of each of the first {args.prompts // args.group} '
      f'prompts. Baseline: the static generator of commit {args.baseline}. Generated tokens/s, '
      f'range over {args.rounds} interleaved rounds after a compiling one; ratios of the best '
      'rounds.', '',
      '| model | workload | engine | tok/s | / baseline | / static |', '|---|---|---|---|---|---|',
      *rows, ''])
  print(report)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(report)
  return 0


if __name__ == '__main__':
  sys.exit(main())
