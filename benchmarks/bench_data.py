"""Data pipeline throughput per host: tokens/s of packed batches at 4,096 and 32,768 per row.

  python -m benchmarks.bench_data [--seconds 10] [--rows 8] [--out benchmarks/results/data.md]

Cases (one process, the host's share of the global batch = --rows rows):
  pipeline   make_iterator on the embedded corpus: generate text, tokenise, pack, batch.
  pipeline-sft  the same with embedded SFT examples (pre-tokenised, 'pad' packing).
  pack-only  data.packing on documents tokenised beforehand: the packing hot path alone.
Tokens/s counts real (unpadded) tokens; 'fill' is the share of row slots holding one
(for SFT rows, the loss mask further drops prompt tokens; those still count as read).
"""

import argparse
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time

import numpy as np

from data import config as data_config
from data import packing, pipeline

VOCAB = 1024


def _cpu_name() -> str:
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown CPU'


def _time_batches(next_batch, seconds: float) -> tuple[float, float, int]:
  """(real tokens/s, fill, batches) over about `seconds` after one warm-up batch."""
  next_batch()
  real = slots = batches = 0
  start = time.perf_counter()
  while time.perf_counter() - start < seconds or batches < 2:
    segments = next_batch()['segment_ids']
    real += int((segments > 0).sum())
    slots += segments.size
    batches += 1
  elapsed = time.perf_counter() - start
  return real / elapsed, real / slots, batches


def bench_pipeline(seq_len: int, rows: int, seconds: float, workdir: str, source: str):
  cfg = data_config.default_config()
  cfg.seq_len = seq_len
  cfg.source = source
  if source != 'embedded':
    cfg.packing = 'pad'
  start = time.perf_counter()
  it = pipeline.make_iterator(cfg, vocab_size=VOCAB, global_batch=rows, workdir=workdir)
  first = next(it)
  first_s = time.perf_counter() - start
  assert first['inputs'].shape == (rows, seq_len)
  tps, fill, n = _time_batches(lambda: next(it), seconds)
  return {'case': 'pipeline' if source == 'embedded' else 'pipeline-sft', 'seq_len': seq_len,
          'rows': rows, 'tokens_per_s': tps, 'fill': fill, 'batches': n, 'first_batch_s': first_s}


def bench_pack_only(seq_len: int, rows: int, seconds: float, workdir: str):
  cfg = data_config.default_config()
  it = pipeline.make_iterator(cfg, vocab_size=VOCAB, global_batch=1, workdir=workdir)
  tok = it.tokenizer
  from data import corpus  # pylint: disable=import-outside-toplevel
  docs = [np.asarray([tok.bos_id] + ids + [tok.eos_id], np.int32)
          for ids in map(tok.encode, corpus.documents(seed=1, num_docs=20_000))]
  examples = [packing.lm_example(d) for d in docs]
  packers = [packing.RowPacker(seq_len) for _ in range(rows)]
  cursor = [0]

  def next_example():
    cursor[0] = (cursor[0] + 1) % len(examples)
    return examples[cursor[0]]

  def next_batch():
    out = [p.pack(next_example) for p in packers]
    return {k: np.stack([r[k] for r in out]) for k in packing.FEATURES}

  tps, fill, n = _time_batches(next_batch, seconds)
  return {'case': 'pack-only', 'seq_len': seq_len, 'rows': rows, 'tokens_per_s': tps,
          'fill': fill, 'batches': n, 'first_batch_s': float('nan')}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--seconds', type=float, default=10.0, help='timed seconds per case')
  parser.add_argument('--rows', type=int, default=8, help='rows per host batch')
  parser.add_argument('--out', default=os.path.join('benchmarks', 'results', 'data.md'))
  args = parser.parse_args(argv)
  results = []
  with tempfile.TemporaryDirectory() as workdir:
    for seq_len in (4_096, 32_768):
      results.append(bench_pipeline(seq_len, args.rows, args.seconds, workdir, 'embedded'))
      results.append(bench_pipeline(seq_len, args.rows, args.seconds, workdir, 'embedded_sft'))
      results.append(bench_pack_only(seq_len, args.rows, args.seconds, workdir))
      for r in results[-3:]:
        print(f"{r['case']:>13} T={r['seq_len']:>6} rows={r['rows']}: "
              f"{r['tokens_per_s']:>12,.0f} tokens/s  fill {r['fill']:.3f}", flush=True)
  header = '| case | tokens per row | rows | tokens/s (real) | fill | batches timed | first batch (s) |'
  lines = [header, '|---|---:|---:|---:|---:|---:|---:|']
  for r in results:
    lines.append(f"| {r['case']} | {r['seq_len']:,} | {r['rows']} | {r['tokens_per_s']:,.0f} | "
                 f"{r['fill']:.3f} | {r['batches']} | {r['first_batch_s']:.2f} |")
  table = '\n'.join(lines)
  print(table)
  command = 'python -m benchmarks.bench_data ' + ' '.join(shlex.quote(a) for a in (argv or sys.argv[1:]))
  report = (f'# Data pipeline throughput (one host, one process)\n\n'
            f'- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n'
            f'- machine: {_cpu_name()}, {os.cpu_count()} cores visible, {platform.system()} '
            f'{platform.release()}, Python {platform.python_version()}\n'
            f'- command: `{command.strip()}`\n'
            f'- tokenizer: unigram trained on the embedded corpus (vocab {VOCAB} asked)\n\n'
            f'{table}\n\n'
            'pipeline: generate embedded text, tokenise (SentencePiece), pack (concat), batch; '
            'pipeline-sft: embedded SFT examples, tokenised up front, packed with the pad policy; '
            'pack-only: packing of pre-tokenised documents.\n')
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w', encoding='utf-8') as f:
    f.write(report)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
