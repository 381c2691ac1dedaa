"""Attention benchmark: compiled memory of forward+backward per implementation, and timings.

CPU mode (default): for batch 1 and lengths up to 32,768, the peak memory XLA plans for
value_and_grad of a packed-causal attention call, read from
`jax.jit(f).lower(...).compile().memory_analysis()` (nothing big is run), for 'chunked' vs
'reference' / 'xla'; the same for --scan_layers 'chunked' layers inside a `lax.scan` (as the
Decoder with scan_layers=True runs them) against the same layers unrolled; then one real
forward+backward of 'chunked' at 32,768 tokens (--run_heads heads, to keep it to a minute) with
the process's peak resident memory; then the wall time of 'chunked' (and 'xla') forward+backward
at 4,096 tokens. --run_len 0 / --time_len 0 / --scan_layers 0 skip those parts.
Writes a markdown table to benchmarks/results/attention.md (or --out).

GPU mode (--gpu): wall time and TFLOP/s of forward+backward in bfloat16 for 'xla', 'cudnn' and
'chunked' at 4,096 and 32,768 tokens; an implementation that does not fit is reported as such.
Writes benchmarks/results/attention_gpu.md unless --out is given.

  python benchmarks/bench_attention.py
  python benchmarks/bench_attention.py --gpu
"""

import argparse
import datetime
import os
import pathlib
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from model import attention as attn  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / 'results'
MIB = 2 ** 20


def packed_ids(t, doc_len):
  """Segment ids / positions of documents of `doc_len` tokens packed into one row of t."""
  index = jnp.arange(t, dtype=jnp.int32)
  return (index // doc_len + 1)[None], (index % doc_len)[None]


def make_step(impl, chunk_size):
  """jit(value_and_grad) of sum(attention(...) * w) with respect to q, k, v."""
  def loss(q, k, v, w, seg, pos):
    out = attn.attention(q, k, v, q_segment_ids_bt=seg, kv_segment_ids_bs=seg, q_positions_bt=pos,
                         kv_positions_bs=pos, implementation=impl, chunk_size=chunk_size)
    return jnp.sum(out.astype(jnp.float32) * w)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def make_layers_step(impl, chunk_size, kv_heads, scan):
  """jit(grad) of `len(w_l)` attention layers on a carry x [b, t, n, h] (q = x * w, k = v = the
  first kv_heads heads of it), with the segment ids and positions closed over by the layer body
  as in the Decoder; inside one `lax.scan` (scan=True) or unrolled."""
  def loss(x_btnh, w_l, seg, pos):
    def layer(x_btnh, w):
      x_btnh = x_btnh * w
      kv_bskh = x_btnh[:, :, :kv_heads]
      out_btnh = attn.attention(x_btnh, kv_bskh, kv_bskh, q_segment_ids_bt=seg,
                                kv_segment_ids_bs=seg, q_positions_bt=pos, kv_positions_bs=pos,
                                implementation=impl, chunk_size=chunk_size)
      return out_btnh, None
    if scan:
      x_btnh = jax.lax.scan(layer, x_btnh, w_l)[0]
    else:
      for i in range(w_l.shape[0]):
        x_btnh = layer(x_btnh, w_l[i])[0]
    return jnp.sum(x_btnh)
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def abstract_args(t, n, k, h, dtype):
  q = jax.ShapeDtypeStruct((1, t, n, h), dtype)
  kv = jax.ShapeDtypeStruct((1, t, k, h), dtype)
  ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
  return q, kv, kv, jax.ShapeDtypeStruct((1, t, n, h), jnp.float32), ids, ids


def concrete_args(t, n, k, h, dtype, doc_len):
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (1, t, n, h), dtype)
  kk = jax.random.normal(keys[1], (1, t, k, h), dtype)
  v = jax.random.normal(keys[2], (1, t, k, h), dtype)
  w = jax.random.normal(keys[3], (1, t, n, h), jnp.float32)
  return (q, kk, v, w, *packed_ids(t, doc_len))


def planned_memory(lowered):
  """(temp, peak) MiB that XLA plans for a lowered step; peak = args + out + temp."""
  mem = lowered.compile().memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes -
          mem.alias_size_in_bytes)
  return mem.temp_size_in_bytes / MIB, peak / MIB


def compiled_memory(impl, t, args):
  """(temp, peak) MiB of one forward+backward step of one attention call."""
  return planned_memory(make_step(impl, args.chunk).lower(
      *abstract_args(t, args.heads, args.kv_heads, args.head_dim, jnp.float32)))


def layers_memory(impl, t, args, scan):
  """(temp, peak) MiB of the gradient of args.scan_layers attention layers."""
  ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
  return planned_memory(make_layers_step(impl, args.chunk, args.kv_heads, scan).lower(
      jax.ShapeDtypeStruct((1, t, args.heads, args.head_dim), jnp.float32),
      jax.ShapeDtypeStruct((args.scan_layers,), jnp.float32), ids, ids))


def time_step(impl, t, args, dtype, repeats):
  """Median seconds of a compiled forward+backward step (after one warm-up call)."""
  step = make_step(impl, args.chunk)
  inputs = concrete_args(t, args.heads, args.kv_heads, args.head_dim, dtype, args.doc_len or t)
  jax.block_until_ready(step(*inputs))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(*inputs))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def causal_flops(t, args):
  """Useful FLOPs of forward+backward under a causal mask: 4 matmuls-worth forward (QK^T, PV:
  2 * 2 * t * t * h per head), 2.5x that backward, halved for causality (one document)."""
  return 0.5 * 3.5 * 4 * args.heads * t * t * args.head_dim


def header(args, title):
  devices = jax.devices()
  return [
      f'# {title}', '',
      f'- date: {datetime.datetime.now().isoformat(timespec="seconds")}',
      f'- command: `python {" ".join(sys.argv)}`',
      f'- machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, '
      f'{platform.platform()}; load average {" / ".join(f"{x:.1f}" for x in os.getloadavg())}',
      f'- device: {devices[0].device_kind} x{len(devices)} ({jax.default_backend()}), jax {jax.__version__}',
      f'- shape: batch 1, {args.heads} query heads, {args.kv_heads} kv heads, head dim {args.head_dim}, '
      f'chunk {args.chunk}', '']


def cpu_report(args):
  lines = header(args, 'Attention on CPU: compiled memory of forward+backward, chunked timing')
  lines += [
      'Memory: `jax.jit(value_and_grad(loss)).lower(...).compile().memory_analysis()`, float32, '
      'segment + position mask (mask values do not change the plan); peak = arguments + outputs '
      '+ temp. Nothing is run for this table.', '',
      '| tokens | one [n, t, t] f32 matrix MiB | ' +
      ' | '.join(f'{i} temp MiB | {i} peak MiB' for i in args.impls) + ' |',
      '|---:|---:|' + '---:|---:|' * len(args.impls)]
  for t in args.lengths:
    row = [str(t), f'{args.heads * t * t * 4 / MIB:,.0f}']
    for impl in args.impls:
      temp, peak = compiled_memory(impl, t, args)
      row += [f'{temp:,.1f}', f'{peak:,.1f}']
    lines.append('| ' + ' | '.join(row) + ' |')
    print(lines[-1], flush=True)
  if args.scan_layers:
    lines += ['', f'Inside a layer scan: gradient of {args.scan_layers} chunked attention layers '
              f'(q = k = v = the carried activations, segment ids and positions closed over by the '
              f'layer body, as in the Decoder with scan_layers=True), in one `lax.scan` vs the '
              f'same layers unrolled; compiled only, float32.', '',
              '| tokens | one [n, t, t] f32 matrix MiB | scan temp MiB | scan peak MiB | '
              'unrolled temp MiB | unrolled peak MiB |', '|---:|---:|---:|---:|---:|---:|']
    for t in args.lengths:
      row = [str(t), f'{args.heads * t * t * 4 / MIB:,.0f}']
      for scan in (True, False):
        temp, peak = layers_memory('chunked', t, args, scan)
        row += [f'{temp:,.1f}', f'{peak:,.1f}']
      lines.append('| ' + ' | '.join(row) + ' |')
      print(lines[-1], flush=True)
  if args.run_len:
    run_args = argparse.Namespace(**{**vars(args), 'heads': args.run_heads,
                                     'kv_heads': args.run_heads})
    sec = time_step('chunked', args.run_len, run_args, jnp.float32, 1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux.
    lines += ['', f'Real run: chunked forward+backward at {args.run_len} tokens, {args.run_heads} '
              f'head(s), head dim {args.head_dim}, float32, one causal document: {sec:.1f} s, peak '
              f'resident memory of this process so far {rss:,.0f} MiB (the memory table above only '
              f'compiles).']
    print(lines[-1], flush=True)
  if not args.time_len:
    return lines
  lines += ['', f'Wall time of forward+backward at {args.time_len} tokens, float32, one document '
            f'(causal), median of {args.repeats} after a warm-up:', '',
            '| implementation | seconds | causal GFLOP/s |', '|---|---:|---:|']
  for impl in args.time_impls:
    sec = time_step(impl, args.time_len, args, jnp.float32, args.repeats)
    lines.append(f'| {impl} | {sec:.3f} | {causal_flops(args.time_len, args) / sec / 1e9:.1f} |')
    print(lines[-1], flush=True)
  return lines


def gpu_report(args):
  if jax.default_backend() != 'gpu':
    raise SystemExit(f'benchmarks/bench_attention.py --gpu: the JAX backend is '
                     f'{jax.default_backend()!r}, not a GPU')
  lines = header(args, 'Attention on GPU: forward+backward time, bfloat16')
  lines += [f'One causal document per row; TFLOP/s counts useful causal FLOPs '
            f'(3.5 x 4 x n x t^2 x h / 2); median of {args.repeats} after a warm-up.', '',
            '| tokens | implementation | ms | TFLOP/s |', '|---:|---|---:|---:|']
  for t in args.gpu_lengths:
    for impl in args.gpu_impls:
      try:
        sec = time_step(impl, t, args, jnp.bfloat16, args.repeats)
        cells = [f'{sec * 1e3:.2f}', f'{causal_flops(t, args) / sec / 1e12:.2f}']
      except Exception as e:  # Out of memory or an unsupported shape: report it, go on.
        cells = [f'failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}', '-']
      lines.append(f'| {t} | {impl} | ' + ' | '.join(cells) + ' |')
      print(lines[-1], flush=True)
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--gpu', action='store_true', help='time xla vs cudnn on a GPU')
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--kv_heads', type=int, default=8)
  parser.add_argument('--head_dim', type=int, default=64)
  parser.add_argument('--chunk', type=int, default=1024)
  parser.add_argument('--doc_len', type=int, default=0, help='packed document length (0: one)')
  parser.add_argument('--lengths', type=int, nargs='+', default=[1024, 4096, 8192, 16384, 32768])
  parser.add_argument('--impls', nargs='+', default=['chunked', 'xla', 'reference'])
  parser.add_argument('--run_len', type=int, default=32768, help='real chunked run (0: skip)')
  parser.add_argument('--run_heads', type=int, default=1)
  parser.add_argument('--scan_layers', type=int, default=2,
                      help='layers of the scanned-vs-unrolled memory table (0: skip)')
  parser.add_argument('--time_len', type=int, default=4096, help='timed length (0: skip)')
  parser.add_argument('--time_impls', nargs='+', default=['chunked', 'xla'])
  parser.add_argument('--gpu_lengths', type=int, nargs='+', default=[4096, 32768])
  parser.add_argument('--gpu_impls', nargs='+', default=['xla', 'cudnn', 'chunked'])
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--out', default='', help='markdown file (default under benchmarks/results)')
  args = parser.parse_args()
  lines = gpu_report(args) if args.gpu else cpu_report(args)
  out = pathlib.Path(args.out or RESULTS / ('attention_gpu.md' if args.gpu else 'attention.md'))
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text('\n'.join(lines) + '\n')
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
