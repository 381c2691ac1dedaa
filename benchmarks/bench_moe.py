"""Forward+backward time of one MoE block vs a dense SwiGLU block with the same active parameters.

MoE: e experts, top-k, expert MLP width f. Dense: SwiGLU of width k * f, so both spend the same
matmul FLOPs per token when nothing is padded or dropped. Timed: jit(value_and_grad) of
sum(y * probe) (+ the MoE aux loss) w.r.t. parameters and input. Variants:
  * capacity  - MoeBlock, dispatch='capacity' (index gather into [e, b, c, d] buffers);
  * einsum    - the same capacity semantics with GShard-style one-hot dispatch/combine einsums,
                defined here only to compare against (checked equal to `capacity` before timing);
  * dropless  - MoeBlock, dispatch='dropless' (`jax.lax.ragged_dot`; on CPU it costs as much as
                running every expert on every token).
Variants are timed round-robin (each round runs each variant once) so load from other users of
the machine spreads over all of them; medians are reported.

  python benchmarks/bench_moe.py --out benchmarks/results/moe_block.md
"""

import argparse
import dataclasses
import datetime
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from model.config import ModelConfig  # noqa: E402
from model.layers import SwiGLU  # noqa: E402
from model.moe import MoeBlock, capacity, slot_positions  # noqa: E402


def einsum_capacity(block: MoeBlock, x_btd):
  """Capacity dispatch with one-hot [b, t, e, c] dispatch/combine tensors (GShard style)."""
  cfg = block.cfg
  b, t, _ = x_btd.shape
  e, c = cfg.num_experts, capacity(cfg, t)
  logits_bte, experts_btk, weights_btk = block.route(x_btd)
  pos_btk = slot_positions(experts_btk, e)
  kept_btk = pos_btk < c
  expert_btke = jax.nn.one_hot(experts_btk, e, dtype=x_btd.dtype) * kept_btk[..., None]
  slot_btkc = jax.nn.one_hot(pos_btk, c, dtype=x_btd.dtype)
  dispatch_btec = jnp.einsum('btke,btkc->btec', expert_btke, slot_btkc)
  combine_btec = jnp.einsum('btk,btke,btkc->btec', weights_btk.astype(x_btd.dtype), expert_btke,
                            slot_btkc)
  x_ebcd = jnp.einsum('btec,btd->ebcd', dispatch_btec, x_btd)
  gate_edf, up_edf, down_efd = block._experts()  # pylint: disable=protected-access
  h_ebcf = (jax.nn.silu(jnp.einsum('ebcd,edf->ebcf', x_ebcd, gate_edf)) *
            jnp.einsum('ebcd,edf->ebcf', x_ebcd, up_edf))
  y_ebcd = jnp.einsum('ebcf,efd->ebcd', h_ebcf, down_efd)
  y_btd = jnp.einsum('btec,ebcd->btd', combine_btec, y_ebcd)
  return y_btd, block._aux(logits_bte, experts_btk, kept_btk)  # pylint: disable=protected-access


def make_step(module, apply):
  graphdef, params = nnx.split(module)

  def loss(params, x_btd, probe_btd):
    y_btd, aux = apply(nnx.merge(graphdef, params), x_btd)
    return jnp.sum(y_btd * probe_btd) + (aux['aux_loss'] if aux else 0.0), y_btd

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  return lambda x, p: step(params, x, p)


def machine() -> str:
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
    info = dict(line.split(':', 1) for line in out.splitlines() if ':' in line)
    return (f"{info.get('Model name', '?').strip()}, {info.get('CPU(s)', '?').strip()} CPUs "
            f"({os.cpu_count()} visible), {platform.machine()}")
  except (OSError, subprocess.CalledProcessError):
    return f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs'


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--length', type=int, default=256)
  ap.add_argument('--d_model', type=int, default=256)
  ap.add_argument('--experts', type=int, default=8)
  ap.add_argument('--top_k', type=int, default=2)
  ap.add_argument('--expert_mlp', type=int, default=1024)
  ap.add_argument('--capacity_factor', type=float, default=1.25)
  ap.add_argument('--rounds', type=int, default=15)
  ap.add_argument('--out', default='', help='write a markdown report here')
  args = ap.parse_args()

  cfg = ModelConfig(d_model=args.d_model, num_heads=4, num_kv_heads=4,
                    mlp_dim=args.top_k * args.expert_mlp, num_experts=args.experts,
                    experts_per_token=args.top_k, moe_mlp_dim=args.expert_mlp,
                    capacity_factor=args.capacity_factor)
  kx, kp = jax.random.split(jax.random.key(0))
  x_btd = jax.random.normal(kx, (args.batch, args.length, args.d_model))
  probe_btd = jax.random.normal(kp, x_btd.shape)

  moe = {d: MoeBlock(dataclasses.replace(cfg, dispatch=d), nnx.Rngs(0))
         for d in ('capacity', 'dropless')}
  steps = {
      'dense': make_step(SwiGLU(cfg, nnx.Rngs(0)), lambda m, x: (m(x), None)),
      'capacity': make_step(moe['capacity'], lambda m, x: m(x)),
      'einsum': make_step(moe['capacity'], einsum_capacity),
      'dropless': make_step(moe['dropless'], lambda m, x: m(x)),
  }
  with jax.default_matmul_precision('highest'):  # Check in full float32 (GPUs default to TF32).
    outs = {name: jax.block_until_ready(step(x_btd, probe_btd)) for name, step in steps.items()}
  for step in steps.values():  # Compile at the default precision, the one timed.
    jax.block_until_ready(step(x_btd, probe_btd))
  (_, y_cap), g_cap = outs['capacity']
  (_, y_ein), g_ein = outs['einsum']
  np.testing.assert_allclose(y_ein, y_cap, rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree.leaves(g_ein), jax.tree.leaves(g_cap)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
  dropped = float(moe['capacity'](x_btd)[1]['dropped_fraction'])

  times = {name: [] for name in steps}
  for _ in range(args.rounds):
    for name, step in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(step(x_btd, probe_btd))
      times[name].append(time.perf_counter() - start)
  ms = {name: 1e3 * float(np.median(ts)) for name, ts in times.items()}
  tokens = args.batch * args.length
  lines = [
      '# MoE block vs dense SwiGLU: forward + backward',
      '',
      f'- date: {datetime.datetime.now().astimezone().isoformat(timespec="seconds")}',
      f'- machine: {machine()}; JAX backend {jax.default_backend()}, '
      f'{jax.device_count()} device(s); '
      f'load average at start of timing {os.getloadavg()[0]:.1f} (shared machine)',
      f'- jax {jax.__version__}, flax {flax.__version__}',
      f'- command: `python {" ".join(sys.argv)}`',
      f'- shapes: {args.batch}x{args.length} = {tokens} tokens, d_model {args.d_model}, '
      f'{args.experts} experts top-{args.top_k}, expert MLP {args.expert_mlp}, dense MLP '
      f'{cfg.mlp_dim} (same active parameters), float32; capacity factor {args.capacity_factor} '
      f'-> {capacity(cfg, args.length)} slots per expert per row, dropped fraction {dropped:.3f}',
      f'- median of {args.rounds} round-robin rounds of jit(value_and_grad) (params and input)',
      '',
      '| variant | ms (median) | ms (min) | / dense |',
      '|---|---|---|---|',
  ]
  for name in steps:
    lines.append(f'| {name} | {ms[name]:.1f} | {1e3 * min(times[name]):.1f} | '
                 f'{ms[name] / ms["dense"]:.2f}x |')
  report = '\n'.join(lines) + '\n'
  print(report)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      f.write(report)


if __name__ == '__main__':
  main()
