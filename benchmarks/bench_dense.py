"""Training throughput and MFU of the tiny dense model on this machine's CPU.

The model of the foundation issue: d_model 256, 4 layers, 4 heads, MLP 1024, vocab 32,000,
batch 8 x 256 tokens, float32, one device. The step timed is the real jitted train step
(`train/step.py`: forward, backward, clipping, AdamW) on a fixed random batch.

MFU = model FLOPs/s (`model/flops.py`, 6 x matmul parameters + causal attention, per token)
divided by the matmul rate of this machine measured in the same run
(`train/metrics.py: measure_matmul_flops`, one 1024^3 float32 matmul over all cores). Steps and
matmul measurements are interleaved round by round, so load from other users of the machine
hits both; the table reports medians and the best round.

  python benchmarks/bench_dense.py --out benchmarks/results/dense_cpu.md
"""

import argparse
import datetime
import os
import platform
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train import hugepages  # noqa: E402

if __name__ == '__main__':
  hugepages.reexec()  # Huge pages for host buffers, as `python -m train` runs (train/hugepages.py).

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from model import training_flops_per_token  # noqa: E402
from train import config as config_lib  # noqa: E402
from train import metrics as metrics_lib  # noqa: E402
from train import optimizer as optimizer_lib  # noqa: E402
from train import state as state_lib  # noqa: E402
from train import step as step_lib  # noqa: E402
from train.mesh import make_mesh  # noqa: E402


def bench_config(args):
  c = config_lib.defaults()
  c.model.update(vocab_size=32_000, d_model=256, num_layers=4, num_heads=4, num_kv_heads=4,
                 mlp_dim=1024, param_dtype='float32', compute_dtype='float32', remat=args.remat,
                 scan_layers=not args.unrolled, attention=args.attention)
  c.data.seq_len = args.seq_len
  c.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
  c.train.update(steps=1000, global_batch=args.batch, grad_accum=1)
  return c


def synthetic_batch(batch: int, seq_len: int, vocab: int, sharding) -> dict:
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, vocab, size=(1, batch, seq_len + 1), dtype=np.int32)
  host = dict(inputs=tokens[..., :-1], targets=tokens[..., 1:],
              positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), (1, batch, seq_len)),
              segment_ids=np.ones((1, batch, seq_len), np.int32),
              loss_mask=np.ones((1, batch, seq_len), np.float32))
  return {k: jax.device_put(np.ascontiguousarray(v), sharding) for k, v in host.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=12)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--seq_len', type=int, default=256)
  parser.add_argument('--remat', default='none')
  parser.add_argument('--attention', default='xla')
  parser.add_argument('--unrolled', action='store_true', help='unrolled layers instead of a scan')
  parser.add_argument('--out', default='', help='write a markdown report here')
  args = parser.parse_args()

  config = bench_config(args)
  cfg = config_lib.validate(config, 1)
  mesh = make_mesh(config.mesh, devices=jax.devices()[:1])
  flops = training_flops_per_token(cfg, args.seq_len)
  tokens = args.batch * args.seq_len
  with jax.set_mesh(mesh):
    tx = optimizer_lib.make(config.optim, config.train.steps)
    schedule = optimizer_lib.schedule(config.optim, config.train.steps)
    state, shardings, mdef = state_lib.create(cfg, tx, mesh, 0)
    batch_sharding = NamedSharding(mesh, P())
    step = step_lib.jit_step(lambda _: step_lib.lm_loss(mdef), tx, schedule, shardings, batch_sharding)
    batch = synthetic_batch(args.batch, args.seq_len, cfg.vocab_size, batch_sharding)
    t0 = time.perf_counter()
    state, metrics = step(state, batch, None)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    rows = []
    for _ in range(args.rounds):
      metrics_lib.measure_matmul_flops.cache_clear()
      peak = metrics_lib.measure_matmul_flops()
      t0 = time.perf_counter()
      state, metrics = step(state, batch, None)
      jax.block_until_ready(metrics)
      dt = time.perf_counter() - t0
      rows.append((dt, peak, tokens * flops.per_token / dt / peak))
  dts, peaks, mfus = (np.array(x) for x in zip(*rows))
  best = int(np.argmin(dts))
  load = os.getloadavg()
  command = 'python ' + ' '.join([os.path.relpath(__file__, os.getcwd())] + sys.argv[1:])
  lines = [
      '# Dense training step on CPU: tokens/s, step time, MFU',
      '',
      f'- date: {datetime.datetime.now().isoformat(timespec="seconds")}',
      f'- command: `{command}`',
      f'- machine: {platform.node() or "vm"} {platform.machine()}, {os.cpu_count()} CPUs, '
      f'{platform.platform()}; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}',
      f'- jax {jax.__version__}, device {jax.devices()[0].device_kind} x1',
      f'- GLIBC_TUNABLES={os.environ.get("GLIBC_TUNABLES", "")!r} (train/hugepages.py)',
      f'- model: d_model {cfg.d_model}, {cfg.num_layers} layers, {cfg.num_heads} heads, MLP {cfg.mlp_dim}, '
      f'vocab {cfg.vocab_size}, float32, remat {cfg.remat}, attention {cfg.attention}, '
      f'{"unrolled" if args.unrolled else "scanned"} layers',
      f'- batch {args.batch} x {args.seq_len} tokens = {tokens} tokens/step; '
      f'model FLOPs/token {flops.per_token:.4g} (attention {flops.attention_per_token:.3g}); compile {compile_s:.1f} s',
      '',
      '| | step time s | tokens/s | matmul rate GFLOP/s | model GFLOP/s | MFU |',
      '|---|---:|---:|---:|---:|---:|',
  ]
  for name, i in (('median', None), ('best step', best)):
    dt = float(np.median(dts)) if i is None else float(dts[i])
    pk = float(np.median(peaks)) if i is None else float(peaks[i])
    mfu = float(np.median(mfus)) if i is None else float(mfus[i])
    lines.append(f'| {name} | {dt:.3f} | {tokens / dt:,.0f} | {pk / 1e9:.1f} | '
                 f'{tokens * flops.per_token / dt / 1e9:.1f} | {mfu:.1%} |')
  lines.append('')
  lines.append(f'MFU per round ({args.rounds} rounds, each: measure the matmul rate, then one step): '
               + ', '.join(f'{m:.0%}' for m in mfus))
  report = '\n'.join(lines) + '\n'
  print(report)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(report)


if __name__ == '__main__':
  main()
