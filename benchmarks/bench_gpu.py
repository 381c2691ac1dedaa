"""Training throughput and MFU on one GPU, and xla vs cudnn attention at 4k and 32k tokens.

Models (one device, the real train step of train/step.py, bfloat16 compute, float32 params and
AdamW state, synthetic tokens):
  * dense ~1B: d_model 2048, 18 layers, 16 heads of 128, MLP 5,632, vocabulary 32,000;
  * Mixtral-width MoE: d_model 4096, 32 query / 8 kv heads of 128, 8 experts of width 14,336,
    top-2, dropless (grouped matmul), 2 layers (the most that fits one 80 GB device with AdamW).
The remat policy of each is the least recomputing one whose analytic memory estimate
(train/memory.py) stays under --memory_fraction of the device's memory; it is reported.
MFU = tokens/s x training FLOPs per token (active experts only, model/flops.py) / peak, with the
peak from --peak_tflops (default: 989 TFLOP/s, H100 SXM dense bf16). Targets: dense >= 55%,
MoE >= 45%. Beside it, the same ratio against the bf16 matmul rate measured in the run
(train/metrics.py measure_matmul_flops, 8192^3 on random data), the device's practical ceiling.
The MoE runs once per --moe_dispatch.

Attention: forward+backward of one packed-causal call (benchmarks/bench_attention.py's step),
Mixtral's heads (32 query, 8 kv, head dim 128), batch 1, bfloat16, for `xla` and `cudnn` at
4,096 and 32,768 tokens. XLA's memory plan is checked against the device first; a plan that
does not fit is reported as such instead of run.

  python benchmarks/bench_gpu.py                   # on a GPU; writes benchmarks/results/gpu.md
  python benchmarks/bench_gpu.py --small           # CPU smoke test: the same code, tiny shapes
"""

import argparse
import datetime
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import bench_attention  # noqa: E402
from model import training_flops_per_token  # noqa: E402
from model.sharding import logical_to_spec, make_rules, use_rules  # noqa: E402
from train import config as config_lib  # noqa: E402
from train import memory as memory_lib  # noqa: E402
from train import optimizer as optimizer_lib  # noqa: E402
from train import state as state_lib  # noqa: E402
from train.metrics import measure_matmul_flops  # noqa: E402
from train import step as step_lib  # noqa: E402
from train.mesh import make_mesh  # noqa: E402

GIB = 2 ** 30
REMAT_ORDER = ('none', 'dots_no_batch', 'attn_proj', 'full')  # Least recompute first.
MODELS = {
    'dense ~1B': dict(
        model=dict(vocab_size=32_000, d_model=2048, num_layers=18, num_heads=16, num_kv_heads=16,
                   head_dim=128, mlp_dim=5632),
        batch=8, seq_len=4096, target=0.55),
    'MoE, Mixtral width, 2 layers': dict(
        model=dict(vocab_size=32_000, d_model=4096, num_layers=2, num_heads=32, num_kv_heads=8,
                   head_dim=128, mlp_dim=14_336, num_experts=8, experts_per_token=2,
                   moe_mlp_dim=14_336, dispatch='dropless', rope_theta=1e6),
        batch=4, seq_len=4096, target=0.45),
}
SMALL = {  # --small: the same code paths at CPU size.
    'dense ~1B': dict(model=dict(vocab_size=512, d_model=64, num_layers=2, num_heads=4,
                                 num_kv_heads=4, head_dim=16, mlp_dim=128), batch=4, seq_len=128),
    'MoE, Mixtral width, 2 layers': dict(model=dict(
        vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        mlp_dim=128, num_experts=4, experts_per_token=2, moe_mlp_dim=128, dispatch='dropless'),
        batch=4, seq_len=128),
}


def device_memory_bytes() -> int:
  """The device's memory limit (0 if the backend does not say, e.g. CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  return int(stats.get('bytes_limit', 0))


def run_config(spec: dict, remat: str, attention: str):
  c = config_lib.defaults()
  c.model.update(spec['model'])
  c.model.update(param_dtype='float32', compute_dtype='bfloat16', scan_layers=True, remat=remat,
                 attention=attention)
  c.data.seq_len = spec['seq_len']
  c.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
  c.optim.update(warmup_steps=10)
  c.train.update(steps=1000, global_batch=spec['batch'], grad_accum=1)
  return c


def choose_remat(spec: dict, attention: str, limit: int, fraction: float):
  """(remat, estimated bytes): the first policy of REMAT_ORDER whose estimate fits."""
  for remat in REMAT_ORDER:
    estimate = memory_lib.estimate(run_config(spec, remat, attention), {}).total
    if not limit or estimate <= fraction * limit:
      return remat, estimate
  return 'full', estimate


def synthetic_batch(c, vocab: int) -> dict:
  b, t = c.train.global_batch, c.data.seq_len
  tokens = np.random.default_rng(0).integers(1, vocab, (1, b, t + 1)).astype(np.int32)
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), (1, b, t))
  ones = np.ones((1, b, t), np.int32)
  return {'inputs': tokens[..., :-1], 'targets': tokens[..., 1:], 'positions': positions,
          'segment_ids': ones, 'loss_mask': ones.astype(np.float32)}


def time_training(c, steps: int, warmup: int) -> dict:
  """Seconds per step of the real jitted train step on one device, after `warmup` steps."""
  cfg = config_lib.validate(c, 1)
  mesh = make_mesh(c.mesh, jax.devices()[:1])
  rules = make_rules()
  with jax.set_mesh(mesh), use_rules(rules):
    tx = optimizer_lib.make(c.optim, c.train.steps)
    schedule = optimizer_lib.schedule(c.optim, c.train.steps)
    state, shardings, mdef = state_lib.create(cfg, tx, mesh, seed=0)
    batch_sharding = jax.sharding.NamedSharding(
        mesh, logical_to_spec((None, 'batch', 'length'), rules=rules))
    batch = jax.device_put(synthetic_batch(c, cfg.vocab_size), batch_sharding)
    step = step_lib.jit_step(lambda _: step_lib.lm_loss(mdef), tx, schedule, shardings, batch_sharding)
    t0 = time.perf_counter()
    for _ in range(warmup):
      state, metrics = step(state, batch, None)
    jax.block_until_ready(state)
    compile_and_warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, batch, None)
    jax.block_until_ready(state)
    seconds = (time.perf_counter() - t0) / steps
  return {'step_seconds': seconds, 'loss': float(metrics['loss']),
          'warmup_seconds': compile_and_warmup,
          'params': sum(x.size for x in jax.tree.leaves(state['params']))}


def model_runs(models: dict, dispatches: list[str]):
  """(row name, spec) per model, the MoE once per dispatch implementation."""
  for name, spec in models.items():
    if not spec['model'].get('num_experts'):
      yield name, spec
      continue
    for dispatch in dispatches:
      yield f'{name}, {dispatch}', dict(spec, model=dict(spec['model'], dispatch=dispatch))


def training_rows(models: dict, args, peak: float, measured: float, limit: int) -> list[str]:
  lines = ['| model | params | tokens/step | remat | attention | estimate GiB | step ms | '
           'tokens/s | MFU | of measured matmul | target |',
           '|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|']
  for name, spec in model_runs(models, args.moe_dispatch):
    remat, estimate = choose_remat(spec, args.attention, limit, args.memory_fraction)
    c = run_config(spec, remat, args.attention)
    cfg = config_lib.model_config(c)
    tokens = spec['batch'] * spec['seq_len']
    flops = training_flops_per_token(cfg, spec['seq_len']).per_token
    try:
      r = time_training(c, args.steps, args.warmup)
      tps = tokens / r['step_seconds']
      mfu = tps * flops / peak
      target = spec.get('target')
      verdict = '-' if target is None else f'{target:.0%} ({"met" if mfu >= target else "not met"})'
      cells = [f'{r["params"]:,}', f'{tokens:,}', remat, args.attention, f'{estimate / GIB:.1f}',
               f'{r["step_seconds"] * 1e3:.1f}', f'{tps:,.0f}', f'{mfu:.1%}',
               f'{tps * flops / measured:.1%}', verdict]
    except Exception as e:  # Out of memory, or a kernel this device lacks: report it, go on.
      cells = ['-', f'{tokens:,}', remat, args.attention, f'{estimate / GIB:.1f}',
               f'failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}', '-', '-', '-', '-']
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    print(lines[-1], flush=True)
  return lines


def attention_rows(args, limit: int) -> list[str]:
  ns = argparse.Namespace(heads=args.attn_heads, kv_heads=args.attn_kv_heads,
                          head_dim=args.attn_head_dim, chunk=1024, doc_len=0)
  dtype = jnp.bfloat16
  lines = ['| tokens | implementation | XLA plan GiB | ms | TFLOP/s |', '|---:|---|---:|---:|---:|']
  for t in args.attn_lengths:
    for impl in args.attn_impls:
      try:
        step = bench_attention.make_step(impl, ns.chunk)
        abstract = bench_attention.abstract_args(t, ns.heads, ns.kv_heads, ns.head_dim, dtype)
        m = step.lower(*abstract).compile().memory_analysis()
        plan = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                - m.alias_size_in_bytes)
        if limit and plan > limit:
          cells = [f'{plan / GIB:.1f}', f'does not fit ({limit / GIB:.0f} GiB device)', '-']
        else:
          sec = bench_attention.time_step(impl, t, ns, dtype, args.repeats)
          cells = [f'{plan / GIB:.2f}', f'{sec * 1e3:.2f}',
                   f'{bench_attention.causal_flops(t, ns) / sec / 1e12:.3f}']
      except Exception as e:  # e.g. cudnn off an NVIDIA GPU.
        cells = ['-', f'failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}', '-']
      lines.append(f'| {t} | {impl} | ' + ' | '.join(cells) + ' |')
      print(lines[-1], flush=True)
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--small', action='store_true', help='tiny shapes (CPU smoke test)')
  parser.add_argument('--peak_tflops', type=float, default=989.0,
                      help='per-device peak for MFU (default: H100 SXM dense bf16)')
  parser.add_argument('--attention', default='cudnn', help='attention of the training runs')
  parser.add_argument('--memory_fraction', type=float, default=0.75,
                      help='remat: least recompute whose estimate is under this x device memory')
  parser.add_argument('--moe_dispatch', nargs='+', default=['dropless', 'capacity'],
                      help='MoE dispatch implementations to time (model/config.py DISPATCH_IMPLS)')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--attn_lengths', type=int, nargs='+', default=[4096, 32768])
  parser.add_argument('--attn_impls', nargs='+', default=['xla', 'cudnn'])
  parser.add_argument('--attn_heads', type=int, default=32)
  parser.add_argument('--attn_kv_heads', type=int, default=8)
  parser.add_argument('--attn_head_dim', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--out', default='', help='markdown file (default: benchmarks/results/'
                      'gpu.md on a GPU; --small only prints unless given)')
  args = parser.parse_args()
  models = MODELS
  if args.small:
    models = SMALL
    args.attention = 'xla'
    args.attn_lengths = [256, 1024]
    args.attn_heads, args.attn_kv_heads, args.attn_head_dim = 4, 2, 32
    args.steps, args.warmup, args.repeats = 2, 1, 2
  elif jax.default_backend() != 'gpu':
    raise SystemExit(f'benchmarks/bench_gpu.py: the JAX backend is {jax.default_backend()!r}; '
                     f'run it on a GPU, or with --small for a CPU smoke test')
  peak = args.peak_tflops * 1e12
  peak_note = f'{args.peak_tflops:g} TFLOP/s per device (--peak_tflops)'
  if args.small and jax.default_backend() == 'cpu':
    peak, peak_note = measure_matmul_flops(), 'CPU: measured f32 matmul rate (smoke test only)'
  if jax.default_backend() == 'cpu':
    measured, measured_note = measure_matmul_flops(), '1024^3 float32'
  else:
    measured, measured_note = measure_matmul_flops(8192, jnp.bfloat16, repeats=10), '8192^3 bfloat16'
  limit = device_memory_bytes()
  device = jax.devices()[0]
  lines = [
      '# One-device training throughput and attention' + (' (--small smoke test)' if args.small else ''),
      '', f'- date: {datetime.datetime.now().isoformat(timespec="seconds")}',
      f'- command: `python {" ".join(sys.argv)}`',
      f'- device: {device.device_kind} ({jax.default_backend()}), memory limit '
      f'{limit / GIB:.1f} GiB, jax {jax.__version__}; host {platform.node()}, '
      f'{os.cpu_count()} CPUs',
      f'- MFU peak: {peak_note}; FLOPs/token: model/flops.py (active experts, causal attention)',
      f'- measured matmul rate ({measured_note}, random operands, best of the repeats): '
      f'{measured / 1e12:.1f} TFLOP/s',
      '', '## Training step (train/step.py), synthetic tokens', '']
  lines += training_rows(models, args, peak, measured, limit)
  lines += ['', f'## Attention forward+backward, batch 1, {args.attn_heads} query / '
            f'{args.attn_kv_heads} kv heads of {args.attn_head_dim}, bfloat16, one causal document',
            f'(TFLOP/s counts useful causal FLOPs; median of {args.repeats} after a warm-up)', '']
  lines += attention_rows(args, limit)
  out = args.out or ('' if args.small else str(HERE / 'results' / 'gpu.md'))
  if out:
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(out).write_text('\n'.join(lines) + '\n')
    print(f'wrote {out}')


if __name__ == '__main__':
  main()
