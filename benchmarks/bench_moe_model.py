"""Training throughput of a whole small MoE decoder on this CPU, and its MFU against the matmul
rate measured in the same run.

One optimiser step = train.step.train_step exactly as the loop runs it (forward, backward with
the aux losses, global-norm clipping, AdamW), jitted with the loop's shardings, on a synthetic
batch of random tokens (no data pipeline in the timing). Model FLOPs per token come from
model/flops.py: active experts only (k of e) plus the router, attention over the causal half;
the dense-equivalent count (all e experts) is printed beside it.

MFU = model FLOPs per second / the rate of one 1024^3 float32 matmul on this machine
(train/metrics.py measure_matmul_flops, the peak the loop itself uses on CPU). The machine is
shared, so the matmul is re-measured in every round next to the steps, rounds are round-robin
over the variants, and each round's MFU uses that round's matmul rate; medians are reported.
A CPU-time MFU (both rates per CPU-second of this process) is shown beside it: it does not
count time taken by other users of the machine.

Variants: MoE with capacity dispatch at capacity factor 1.0 (e*c == t*k slots: the expert
matmuls execute exactly the active FLOPs counted) and 1.25 (25% padded slots run but are not
counted), dropless, and a dense decoder with MLP width k * expert width (same active FLOPs).

Default shape: Mixtral 8x7B's proportions at d_model 512 and its work per device per step.
8 query / 2 key-value heads of 64 (GQA 4:1, as 32 / 8), 8 experts of width 1,792 = 3.5 x d_model
(as 14,336 / 4,096), top-2, 4 layers, vocabulary 2,048; 32 x 256 = 8,192 tokens per optimiser step,
which is what each of Mixtral's 512 devices processes of its 4M-token batch. Fewer tokens per step
spread the per-step costs (AdamW over all experts' weights, per-layer weight copies) over fewer
tokens: the shape measured before (`--batch 8 --kv_heads 4 --expert_mlp 1024`) is kept in
benchmarks/results/moe_model_cpu_b8.md.

  python benchmarks/bench_moe_model.py --out benchmarks/results/moe_model_cpu.md
"""

import argparse
import datetime
import os
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train import hugepages  # noqa: E402

if __name__ == '__main__':
  hugepages.reexec()  # Huge pages for host buffers, as `python -m train` runs (train/hugepages.py).

import flax  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from benchmarks.bench_moe import machine  # noqa: E402
from model import ModelConfig, count_params, training_flops_per_token  # noqa: E402
from model.moe import capacity  # noqa: E402
from model.sharding import logical_to_spec, make_rules, use_rules  # noqa: E402
from train import metrics as metrics_lib  # noqa: E402
from train import optimizer as optimizer_lib  # noqa: E402
from train import state as state_lib  # noqa: E402
from train import step as step_lib  # noqa: E402
from train.config import defaults  # noqa: E402
from train.mesh import make_mesh  # noqa: E402


def parse_mesh(spec: str) -> dict:
  sizes = dict(data=1, fsdp=1, expert=1, tensor=1)
  for item in filter(None, spec.split(',')):
    name, value = item.split('=')
    sizes[name] = int(value)
  return sizes


def variants(args) -> dict[str, ModelConfig]:
  base = dict(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers,
              num_heads=args.heads, num_kv_heads=args.kv_heads, mlp_dim=args.top_k * args.expert_mlp,
              attention=args.attention, remat='none', scan_layers=True)
  moe = dict(base, num_experts=args.experts, experts_per_token=args.top_k,
             moe_mlp_dim=args.expert_mlp)
  out = {}
  for name in args.variants.split(','):
    if name == 'dense':
      out[name] = ModelConfig(**base)
    elif name.startswith('capacity'):
      factor = float(name.split('@')[1]) if '@' in name else 1.25
      out[name] = ModelConfig(**moe, dispatch='capacity', capacity_factor=factor)
    elif name == 'dropless':
      out[name] = ModelConfig(**moe, dispatch='dropless')
    else:
      raise SystemExit(f'--variants: unknown {name!r} (dense, capacity@F, dropless)')
  return out


class Runner:
  """One variant's state and jitted train step on the mesh, with a fixed synthetic batch."""

  def __init__(self, cfg: ModelConfig, mesh, rules, args):
    self.cfg, self.mesh, self.rules = cfg, mesh, rules
    optim = defaults().optim
    optim.update(peak_lr=1e-3, warmup_steps=0)
    tx = optimizer_lib.make(optim, 1000)
    with jax.set_mesh(mesh), use_rules(rules):
      self.state, shardings, mdef = state_lib.create(cfg, tx, mesh, seed=0)
      sharding = NamedSharding(mesh, logical_to_spec((None, 'batch', 'length'), rules=rules))
      rng = np.random.default_rng(0)
      b, t = args.batch, args.seq
      batch = {'inputs': rng.integers(0, cfg.vocab_size, (1, b, t)).astype(np.int32),
               'targets': rng.integers(0, cfg.vocab_size, (1, b, t)).astype(np.int32),
               'positions': np.broadcast_to(np.arange(t, dtype=np.int32), (1, b, t)).copy(),
               'segment_ids': np.ones((1, b, t), np.int32),
               'loss_mask': np.ones((1, b, t), np.float32)}
      self.batch = jax.device_put(batch, sharding)
      self.step_fn = step_lib.jit_step(lambda _: step_lib.lm_loss(mdef), tx,
                                       optimizer_lib.schedule(optim, 1000), shardings, sharding)
    self.metrics = None

  def step(self) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one step."""
    with jax.set_mesh(self.mesh), use_rules(self.rules):
      start, cpu = time.perf_counter(), time.process_time()
      self.state, self.metrics = self.step_fn(self.state, self.batch, None)
      jax.block_until_ready((self.state, self.metrics))
      return time.perf_counter() - start, time.process_time() - cpu


def matmul_cpu_rate(n: int = 1024, repeats: int = 3) -> float:
  """FLOPs per CPU-second (this process) of the n^3 float32 matmul, best of `repeats`."""
  a = jax.device_put(np.ones((n, n), np.float32), jax.local_devices()[0])
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    cpu = time.process_time()
    f(a).block_until_ready()
    best = min(best, time.process_time() - cpu)
  return 2 * n ** 3 / best


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--batch', type=int, default=32)
  ap.add_argument('--seq', type=int, default=256)
  ap.add_argument('--vocab', type=int, default=2048)
  ap.add_argument('--d_model', type=int, default=512)
  ap.add_argument('--layers', type=int, default=4)
  ap.add_argument('--heads', type=int, default=8)
  ap.add_argument('--kv_heads', type=int, default=2)
  ap.add_argument('--experts', type=int, default=8)
  ap.add_argument('--top_k', type=int, default=2)
  ap.add_argument('--expert_mlp', type=int, default=1792)
  ap.add_argument('--attention', default='xla')
  ap.add_argument('--variants', default='capacity@1.0,capacity@1.25,dropless,dense')
  ap.add_argument('--mesh', default='', help='e.g. expert=2 (default: one device)')
  ap.add_argument('--rounds', type=int, default=5)
  ap.add_argument('--out', default='', help='write a markdown report here')
  args = ap.parse_args()

  sizes = parse_mesh(args.mesh)
  n = int(np.prod(list(sizes.values())))
  mesh = make_mesh(sizes, devices=jax.devices()[:n])
  rules = make_rules()
  cfgs = variants(args)
  tokens = args.batch * args.seq
  runners, flops, compile_s = {}, {}, {}
  for name, cfg in cfgs.items():
    start = time.perf_counter()
    runners[name] = Runner(cfg, mesh, rules, args)
    runners[name].step()  # Compile.
    compile_s[name] = time.perf_counter() - start
    flops[name] = training_flops_per_token(cfg, args.seq)
    print(f'{name}: compiled and ran one step in {compile_s[name]:.1f}s', flush=True)

  load = os.getloadavg()
  matmul = metrics_lib.measure_matmul_flops.__wrapped__
  rates, cpu_rates, times = [], [], {name: [] for name in cfgs}
  mfu, cpu_mfu = {name: [] for name in cfgs}, {name: [] for name in cfgs}
  for _ in range(args.rounds):
    rate, cpu_rate = matmul(repeats=3), matmul_cpu_rate()
    rates.append(rate)
    cpu_rates.append(cpu_rate)
    for name, runner in runners.items():
      dt, cpu = runner.step()
      times[name].append(dt)
      mfu[name].append(tokens * flops[name].per_token / dt / rate)
      cpu_mfu[name].append(tokens * flops[name].per_token / cpu / cpu_rate)
  load_end = os.getloadavg()

  med = lambda xs: float(np.median(xs))
  cfg0 = next(iter(cfgs.values()))
  lines = [
      '# Whole MoE decoder: training throughput and MFU on CPU',
      '',
      f'- date: {datetime.datetime.now().astimezone().isoformat(timespec="seconds")}',
      f'- machine: {machine()}; JAX backend {jax.default_backend()}, mesh {dict(mesh.shape)}; '
      f'load average (1/5/15 min) {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} before timing, '
      f'{load_end[0]:.1f}/{load_end[1]:.1f}/{load_end[2]:.1f} after (2 cores shared by other users)',
      f'- jax {jax.__version__}, flax {flax.__version__}',
      f'- GLIBC_TUNABLES={os.environ.get("GLIBC_TUNABLES", "")!r} (train/hugepages.py)',
      f'- command: `python {" ".join(sys.argv)}`',
      f'- model: {args.layers} layers, d_model {args.d_model}, {args.heads} heads / {args.kv_heads} '
      f'kv heads of {cfg0.dim_per_head}, vocab {args.vocab}, {args.experts} experts top-{args.top_k} '
      f'of width {args.expert_mlp} in every layer (dense variant: MLP {args.top_k * args.expert_mlp}), '
      f'float32, attention `{args.attention}`, no remat; batch {args.batch} x {args.seq} = {tokens} '
      f'tokens per step; full train step (fwd + bwd + clip + AdamW)',
      f'- matmul rate (1024^3 float32, measure_matmul_flops, best of 3, once per round): median '
      f'{med(rates) / 1e9:.1f} GFLOP/s, range {min(rates) / 1e9:.1f}-{max(rates) / 1e9:.1f}; '
      f'per CPU-second {med(cpu_rates) / 1e9:.1f} GFLOP',
      f'- {args.rounds} round-robin rounds; MFU of a round = step FLOPs / step time / that '
      f"round's matmul rate; medians. CPU-time MFU: the same ratio with both rates per CPU-second of "
      f'this process (step FLOPs / step CPU time vs matmul FLOPs / matmul CPU time): insensitive to '
      f'time lost to other users, but blind to cores this process leaves idle',
      '',
      '| variant | params (total / active) | GFLOP/step (active; dense-eq.) | step s (median) '
      '| tokens/s | MFU (median) | MFU (best round) | CPU-time MFU (median) | compile s |',
      '|---|---|---|---|---|---|---|---|---|',
  ]
  for name, cfg in cfgs.items():
    counts = count_params(cfg)
    f = flops[name]
    note = ''
    if cfg.is_moe and cfg.dispatch == 'capacity':
      note = f' (c={capacity(cfg, args.seq)}/expert/row)'
    lines.append(
        f'| {name}{note} | {counts.total / 1e6:.1f}M / {counts.active / 1e6:.1f}M | '
        f'{tokens * f.per_token / 1e9:.1f}; {tokens * f.dense_equivalent / 1e9:.1f} | '
        f'{med(times[name]):.2f} | {tokens / med(times[name]):.0f} | {med(mfu[name]):.1%} | '
        f'{max(mfu[name]):.1%} | {med(cpu_mfu[name]):.1%} | {compile_s[name]:.0f} |')
  lines.append('')
  lines.append('MFU per round (round-robin order as run): ' + '; '.join(
      f'{name} ' + ', '.join(f'{x:.0%}' for x in mfu[name]) for name in cfgs) +
      '. Matmul rate per round (GFLOP/s): ' + ', '.join(f'{r / 1e9:.0f}' for r in rates))
  for name, runner in runners.items():
    m = runner.metrics
    if 'moe/dropped_fraction' in m:
      lines.append(f'\n{name}: last step loss {float(m["loss"]):.3f}, dropped fraction '
                   f'{float(m["moe/dropped_fraction"]):.3f}, expert load '
                   f'{float(m["moe/expert_load_min"]):.3f}-{float(m["moe/expert_load_max"]):.3f}')
  report = '\n'.join(lines) + '\n'
  print(report)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      f.write(report)


if __name__ == '__main__':
  main()
