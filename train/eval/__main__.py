"""python -m train.eval --checkpoint DIR [--config experiments/X.py] --tasks mmlu,gsm8k,humaneval,loss
       [--limit N] [--out results.json] [--data_dir DIR] [--max_new_tokens N] [--mmlu_subjects a,b]

Evaluates a checkpoint (train/eval/model_lm.py) on the benchmarks and on `loss` (the mean token loss
of `train.eval_batches` batches of the eval split); prints a table, writes JSON. `--limit` caps the
questions per MMLU subject and the GSM8K and HumanEval problems; `--config`: default config.json.
"""

import argparse
import os
import sys

import jax

from model.config import ConfigError
from train import compilation_cache, loop
from train import context as context_lib
from train import generate as gen_lib
from train import stage as stage_lib
from train import workdir as workdir_lib
from train.eval import gsm8k, humaneval, mmlu, report
from train.eval.model_lm import MeshLM
from train.eval.sandbox import SandboxError
from train.mesh import make_mesh

TASKS = ('mmlu', 'gsm8k', 'humaneval', 'loss')


def eval_loss(config, lm, workdir: str) -> dict:
  """The `loss` task (module docstring): train/loop.py's evaluator of the LM stage."""
  gen, stage = lm.gen, stage_lib.lm_stage(config)
  ctx = context_lib.RunContext(gen.mesh, gen.rules, config=config, cfg=gen.cfg, workdir=workdir)
  evaluate = loop.evaluator(lambda frozen: stage.make_loss(gen.mdef, frozen),
                            lambda: stage.make_data(ctx, 'eval'), stage, ctx)
  with jax.set_mesh(gen.mesh):
    m = evaluate(gen.params, None)
  return {'task': 'loss', 'metrics': {'loss': m['eval/loss'], 'perplexity': m['eval/perplexity']},
          'count': int(m['eval/count']), 'config': {'eval_batches': config.train.eval_batches,
                                                    'source': str(config.data.source)}}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m train.eval', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True)
  parser.add_argument('--config', default='')
  parser.add_argument('--tasks', default='mmlu,gsm8k,humaneval,loss')
  parser.add_argument('--limit', type=int, default=None)
  parser.add_argument('--out', default='', help='JSON results (default: CHECKPOINT_WORKDIR/eval_<step>.json)')
  parser.add_argument('--humaneval_samples', type=int, default=1,
                      help='completions per HumanEval problem: pass@k for every k in (1, 10, 100) <= it')
  parser.add_argument('--temperature', type=float, default=0.0,
                      help='HumanEval sampling temperature (> 0 when --humaneval_samples > 1)')
  parser.add_argument('--mesh', default='',
                      help="e.g. 'fsdp=8,tensor=1'; default: the run's mesh, or fsdp over all devices "
                           "when that does not match this machine")
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--max_new_tokens', type=int, default=None,
                      help='GSM8K / HumanEval generation length (default: theirs, 256 / 512)')
  parser.add_argument('--mmlu_subjects', default='', help='comma-separated (default: all)')
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--max_length', type=int, default=0, help='default: config.data.seq_len')
  args = parser.parse_args(argv)
  tasks = [t.strip() for t in args.tasks.split(',') if t.strip()]
  if (unknown := sorted(set(tasks) - set(TASKS))) or not tasks:
    parser.error(f'--tasks: unknown {unknown}; choose from {TASKS}')
  compilation_cache.enable()
  try:
    run = workdir_lib.load_run(args.checkpoint, args.config or None, mesh=eval_mesh(args))
    gen = gen_lib.Generator.of(run, max_batch=args.batch_size)
    lm = MeshLM(gen, max_length=args.max_length or int(run.config.data.seq_len),
                batch_size=args.batch_size)
    gen_kw = {} if args.max_new_tokens is None else {'max_new_tokens': args.max_new_tokens}
    tasks_fn = {
        'mmlu': lambda: mmlu.evaluate(
            lm, args.data_dir, count_tokens=lm.count_tokens, max_length=lm.max_length,
            subject_names=[s for s in args.mmlu_subjects.split(',') if s] or None,
            limit_per_subject=args.limit),
        'gsm8k': lambda: gsm8k.evaluate(lm, args.data_dir, limit=args.limit, **gen_kw),
        'humaneval': lambda: humaneval.evaluate(
            lm, args.data_dir, limit=args.limit, num_samples=args.humaneval_samples,
            temperature=args.temperature, **gen_kw),
        'loss': lambda: eval_loss(run.config, lm, run.workdir)}
    results = []
    for task in tasks:
      print(f'[{task}]', file=sys.stderr, flush=True)
      results.append(tasks_fn[task]())
  except (ConfigError, FileNotFoundError, ValueError, SandboxError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if benchmarks := [r for r in results if r['task'] != 'loss']:
    print(report.format_table(benchmarks), flush=True)
  for r in results:
    if r['task'] == 'loss':  # Not a fraction: report.py would print it as a percentage.
      print(f'loss: {r["metrics"]["loss"]:.4f} (perplexity {r["metrics"]["perplexity"]:.3f}) '
            f'over {r["count"]} tokens of the eval split')
  out = args.out or os.path.join(run.workdir, f'eval_{run.step}.json')
  path = report.write_json(results, out, extra={
      'checkpoint': args.checkpoint, 'step': run.step, 'tasks': tasks, 'limit': args.limit})
  print(f'wrote {path}')
  return 0


def eval_mesh(args):
  """The mesh: --mesh, else the run's if this machine fits it, else fsdp over all devices."""
  sizes = dict(data=1, fsdp=-1, expert=1, tensor=1)
  if args.mesh:
    try:
      sizes.update({k: int(v) for k, v in (item.split('=') for item in args.mesh.split(','))})
    except ValueError:
      raise ConfigError(f"--mesh={args.mesh!r}: use e.g. 'fsdp=4,tensor=2'")
    return make_mesh(sizes)
  config = workdir_lib.load_config(args.config or None, workdir_lib.run_workdir(args.checkpoint))
  try:
    return make_mesh(config.mesh)
  except ConfigError as e:
    print(f'note: {e}; evaluating with fsdp over all {len(jax.devices())} devices', file=sys.stderr)
    return make_mesh(sizes)


if __name__ == '__main__':
  sys.exit(main())
