"""Rollout throughput (generated tokens/s): continuous vs static batching at equal slots, on CPU.

Three engines over the same prompts, slots and model, timed round by round in turn so that load
from other users of the machine hits all alike:
  main-static   main's Generator (git archive of branch `main`: left-padded batches of `slots`
                prompts, one prefill, decode until every row stops), in a worker process;
  static        this tree's engine with admission only when every slot is free;
  continuous    this tree's engine (train/generate.py, model/decode.py).
Each worker compiles in a warm-up round, then runs one timed round per request of the parent.

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
  gen = gen_lib.Generator(cfg, params, StubTokenizer(job['stop_ids'][0]), max_batch=job['slots'])
  kw = dict(max_new_tokens=job['max_new_tokens'], sampling=Sampling(temperature=1.0),
            stop_ids=job['stop_ids'], seed=0)
  prompts, slots = job['prompts'], job['slots']

  def run(engine):
    if engine == 'main-static':  # main's Generator.complete: `slots` prompts per batch.
      outs = [gen.generate_ids(prompts[i:i + slots], **kw) for i in range(0, len(prompts), slots)]
    else:
      outs = [gen.generate_ids(prompts, static=engine == 'static', **kw)]
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
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  if args.worker:
    with open(args.worker) as f:
      worker(json.load(f))
    return 0
  main_tree = tempfile.mkdtemp(prefix='meshlm_main_')
  subprocess.run(f'git -C {REPO} archive main | tar -x -C {main_tree}', shell=True, check=True)
  prompts, stop_ids, mean_reply, tok = prompts_and_stops(args.prompts, 2048)
  lengths = sorted(len(p) for p in prompts)
  rows, started = [], time.time()
  for name in args.models.split(','):
    job = dict(vocab=tok.vocab_size, model=MODELS[name], prompts=prompts, stop_ids=stop_ids,
               slots=args.slots, max_new_tokens=args.max_new_tokens)
    job_file = os.path.join(tempfile.mkdtemp(), 'job.json')
    with open(job_file, 'w') as f:
      json.dump(job, f)
    workers = {}
    for engine, tree in (('main-static', main_tree), ('static', REPO), ('continuous', REPO)):
      tree_worker = next((w for e, (w, t) in workers.items() if t == tree), None)
      workers[engine] = (tree_worker or subprocess.Popen(
          [sys.executable, os.path.join(REPO, 'benchmarks', 'bench_rollout.py'), '--worker',
           job_file], cwd=tree, env={**os.environ, 'PYTHONPATH': tree}, stdin=subprocess.PIPE,
          stdout=subprocess.PIPE, text=True), tree)
    results = {e: [] for e in workers}
    for r in range(args.rounds + 1):  # Round 0 compiles.
      for engine in (list(workers) if r % 2 else list(workers)[::-1]):
        w = workers[engine][0]
        w.stdin.write(engine + '\n')
        w.stdin.flush()
        out = json.loads(w.stdout.readline())
        if r:
          results[engine].append(out['tokens'] / out['seconds'])
        print(name, engine, r, out, flush=True)
    for w, _ in {id(w): (w, t) for w, t in workers.values()}.values():
      w.stdin.close()
      w.wait()
    best = {e: max(v) for e, v in results.items()}
    rows.append(f"| {name} | {args.slots} | " + ' | '.join(
        f'{min(v):.0f}-{max(v):.0f}' for v in results.values()) +
        f" | {best['continuous'] / best['main-static']:.2f}x | "
        f"{best['continuous'] / best['static']:.2f}x |")
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
      f'{args.max_new_tokens}; temperature 1. Generated tokens/s, range over {args.rounds} '
      'interleaved rounds after a compiling one; ratios of the best rounds.', '',
      '| model | slots | main-static tok/s | static tok/s | continuous tok/s | '
      'continuous / main-static | continuous / static |', '|---|---|---|---|---|---|---|',
      *rows, ''])
  print(report)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(report)
  return 0


if __name__ == '__main__':
  sys.exit(main())
