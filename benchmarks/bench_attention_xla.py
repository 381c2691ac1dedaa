"""Our 'xla' attention against `jax.nn.dot_product_attention(implementation='xla')` on CPU.

Forward+backward (value_and_grad with respect to q, k, v) of one attention layer at the whole-
model benchmarks' shape: 32 rows x 256 tokens, 8 query / 2 kv heads of 64 (GQA), float32, packed
documents (two per row) under the segment + causal mask. 'jax.nn' is jax's own dense attention
with the same mask, its fully masked rows zeroed as model/attention.py's contract asks; 'xla' is
model/attention.py's written-out version (queries regrouped per kv head, backward by hand);
'reference' is the plain-einsum ground truth. The CPU is shared, so the implementations run
round-robin and each round's time is divided by the same round's 'jax.nn' time; medians.

  python benchmarks/bench_attention_xla.py --out benchmarks/results/attention_xla_cpu.md
"""

import argparse
import datetime
import os
import statistics
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train import hugepages  # noqa: E402

if __name__ == '__main__':
  hugepages.reexec()  # Huge pages for host buffers, as `python -m train` runs (train/hugepages.py).

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.bench_attention import make_step, packed_ids  # noqa: E402
from benchmarks.bench_moe import machine  # noqa: E402
from model import attention as attn  # noqa: E402

IMPLS = ('jax.nn', 'xla', 'reference')


def jax_nn_step():
  """bench_attention.make_step's loss with jax's dense attention in place of attn.attention."""
  def loss(q_btnh, k_bskh, v_bskh, w_btnh, seg_bt, pos_bt):
    mask_bts = attn.make_mask(seg_bt, seg_bt, pos_bt, pos_bt)
    out_btnh = jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask_bts[:, None],
                                            implementation='xla')
    # Rows with no allowed key are zeros in model/attention.py's contract.
    out_btnh = jnp.where(jnp.any(mask_bts, axis=-1)[:, :, None, None], out_btnh, 0)
    return jnp.sum(out_btnh * w_btnh)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--batch', type=int, default=32)
  ap.add_argument('--seq', type=int, default=256)
  ap.add_argument('--heads', type=int, default=8)
  ap.add_argument('--kv_heads', type=int, default=2)
  ap.add_argument('--head_dim', type=int, default=64)
  ap.add_argument('--rounds', type=int, default=15)
  ap.add_argument('--out', default='')
  args = ap.parse_args()
  b, t, n, k, h = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(keys[0], (b, t, n, h))
  kk, v = (jax.random.normal(key, (b, t, k, h)) for key in keys[1:3])
  w = jax.random.normal(keys[3], (b, t, n, h))
  seg, pos = (jnp.broadcast_to(ids, (b, t)) for ids in packed_ids(t, t // 2))
  inputs = (q, kk, v, w, seg, pos)

  steps = {'jax.nn': jax_nn_step(), 'xla': make_step('xla', 1024),
           'reference': make_step('reference', 1024)}
  results = {name: jax.block_until_ready(step(*inputs)) for name, step in steps.items()}
  want = jax.tree.leaves(results['reference'][1])
  errors = {name: max(float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r)))
                      for g, r in zip(jax.tree.leaves(res[1]), want))
            for name, res in results.items()}
  times = {name: [] for name in IMPLS}
  for i in range(args.rounds):
    for name in (list(IMPLS) if i % 2 == 0 else list(IMPLS)[::-1]):
      t0 = time.perf_counter()
      jax.block_until_ready(steps[name](*inputs))
      times[name].append(time.perf_counter() - t0)
  flops = 3 * 4 * b * n * t * t * h  # Executed: the whole [t, t] score matrix, fwd + 2x bwd.
  lines = [
      '# Attention forward+backward on CPU: model/attention.py `xla` vs jax.nn',
      '',
      f'- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}',
      f'- machine: {machine()}',
      f'- jax {jax.__version__}; GLIBC_TUNABLES={os.environ.get("GLIBC_TUNABLES", "")!r}',
      f'- command: `python {" ".join(sys.argv)}`',
      f'- shape: {b} x {t} tokens, {n} query / {k} kv heads of {h}, float32, two packed documents '
      f'per row; value_and_grad wrt q, k, v; {args.rounds} round-robin rounds (order alternating)',
      '',
      '| implementation | ms (median) | GFLOP/s executed (median) | time / jax.nn (median of rounds) '
      '| max grad error vs reference (relative to max) |',
      '|---|---:|---:|---:|---:|',
  ]
  for name in IMPLS:
    ratio = statistics.median(a / r for a, r in zip(times[name], times['jax.nn']))
    ms = statistics.median(times[name]) * 1e3
    lines.append(f'| {name} | {ms:.1f} | {flops / ms / 1e6:.1f} | {ratio:.3f} | '
                 f'{errors[name]:.1e} |')
  lines.append('')
  lines.append('Per round (ms): ' + '; '.join(
      f'{name} ' + ', '.join(f'{x * 1e3:.0f}' for x in times[name]) for name in IMPLS))
  text = '\n'.join(lines) + '\n'
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text)


if __name__ == '__main__':
  main()
