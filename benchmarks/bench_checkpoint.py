"""Cost of verified checkpoints (train/checkpoint.py): CRC-32 throughput, the checksums written at
save and verified at restore (seconds per GiB), and a synchronous save against orbax's
asynchronous one (what the kill bound costs), on a state of --gib GiB of random float32 arrays
on one CPU device. Files are read back from the page cache (just written). About half a minute.
Writes benchmarks/results/checkpoint_verify.md (or --out).

  python benchmarks/bench_checkpoint.py [--gib 0.5]
"""

import argparse
import datetime
import os
import pathlib
import platform
import sys
import tempfile
import time
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # Run as a script.
from train import checkpoint as ckpt_lib  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parent / 'results' / 'checkpoint_verify.md'


def timed(fn):
  start = time.perf_counter()
  result = fn()
  return time.perf_counter() - start, result


def cpu_name() -> str:
  with open('/proc/cpuinfo', encoding='utf-8') as f:
    return next((l.split(':', 1)[1].strip() for l in f if l.startswith('model name')), 'unknown')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--gib', type=float, default=0.5)
  parser.add_argument('--out', default=str(OUT))
  args = parser.parse_args(argv)
  load = os.getloadavg()[0]
  buf = np.random.default_rng(0).bytes(256 << 20)
  crc_s, _ = timed(lambda: zlib.crc32(buf))
  leaf = int(args.gib * (1 << 30)) // 8 // 4
  rng = np.random.default_rng(1)
  state = {'step': jax.numpy.asarray(1, jax.numpy.int32), 'params': {f'w{i}': jax.numpy.asarray(rng.standard_normal(
      leaf, np.float32)) for i in range(8)}}
  gib = sum(x.nbytes for x in jax.tree.leaves(state)) / (1 << 30)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  with tempfile.TemporaryDirectory() as root:
    ck = ckpt_lib.Checkpointer(os.path.join(root, 'sync'))
    sync_s, _ = timed(lambda: ck.save(1, state, {}))
    step_dir = os.path.join(root, 'sync', '1')
    files = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(step_dir)
                for f in fs) / (1 << 30)
    checksum_s, _ = timed(lambda: ckpt_lib.write_checksums(step_dir))
    verify_s, _ = timed(lambda: ckpt_lib.verify(step_dir))
    restore_s, _ = timed(lambda: ck.restore(state, shardings))
    ck.close()
    manager = ocp.CheckpointManager(os.path.join(root, 'async'), item_names=ckpt_lib.ITEMS)
    async_args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({}))
    async_block_s, _ = timed(lambda: manager.save(1, args=async_args))
    async_done_s, _ = timed(manager.wait_until_finished)
    manager.close()
  per_gib = lambda s: f'{s / files:.2f}'
  state_1b = 12 * 1e9 / (1 << 30)  # fp32 params + two AdamW moments of a 1B-parameter model.
  lines = [
      '# Verified checkpoints: cost of checksums and synchronous saves', '',
      f'- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}',
      f'- machine: {cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, '
      f'Python {platform.python_version()}, jax {jax.__version__}, orbax {ocp.__version__}',
      f'- load average at start: {load:.1f} (other jobs shared the cores)',
      f'- command: `python benchmarks/bench_checkpoint.py --gib {args.gib}`',
      f'- state: {gib:.2f} GiB of float32 (8 arrays, one CPU device); files of the step: '
      f'{files:.2f} GiB, read from the page cache', '',
      '| what | seconds | seconds per GiB of files |', '| --- | --- | --- |',
      f'| zlib.crc32 of 256 MiB in memory | {crc_s:.3f} | {crc_s * 4:.2f} '
      f'({0.25 / crc_s:.2f} GiB/s) |',
      f'| checksums written at save (`write_checksums`) | {checksum_s:.3f} | {per_gib(checksum_s)} |',
      f'| verification at restore (`verify`) | {verify_s:.3f} | {per_gib(verify_s)} |',
      f'| restore after verification (`Checkpointer.restore`, incl. verify) | {restore_s:.3f} | '
      f'{per_gib(restore_s)} |',
      f'| synchronous save (`Checkpointer.save`, incl. checksums) | {sync_s:.3f} | {per_gib(sync_s)} |',
      f'| orbax asynchronous save: blocking part | {async_block_s:.3f} | {per_gib(async_block_s)} |',
      f'| orbax asynchronous save: rest, until committed | {async_done_s:.3f} | '
      f'{per_gib(async_done_s)} |', '',
      f'Against a save interval: a 1B-parameter model\'s full state (fp32 params and AdamW moments, '
      f'{state_1b:.1f} GiB) at these rates costs {state_1b * checksum_s / files:.0f} s of checksums '
      f'per save and {state_1b * verify_s / files:.0f} s of verification per restore; with '
      f'`train.ckpt_every=200` and 1 s steps (an assumed step time) a save interval is 200 s, so '
      f'the checksums take {100 * state_1b * checksum_s / files / 200:.0f}% of it; they add '
      f'{100 * checksum_s / (sync_s - checksum_s):.0f}% to a save and verification '
      f'{100 * verify_s / (restore_s - verify_s):.0f}% to a restore. The synchronous '
      f'save (what bounds a kill -9 to one save interval) blocks the loop '
      f'{state_1b * sync_s / files:.0f} s per save ({100 * state_1b * sync_s / files / 200:.0f}% of '
      f'that interval) where orbax\'s asynchronous save blocks {state_1b * async_block_s / files:.0f} '
      f's and writes the rest while training continues.', '']
  pathlib.Path(args.out).write_text('\n'.join(lines))
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
