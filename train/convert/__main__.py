"""CLI: `python -m train.convert from-hf HF_DIR OUT_DIR` and `... to-hf CKPT_DIR OUT_DIR`."""

import argparse
import logging
import re
import sys

from model.config import ConfigError
from train.convert import hf_layout, safetensors_io
from train.convert.exporter import to_hf
from train.convert.importer import from_hf

_UNITS = {'': 1, 'B': 1, 'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'KIB': 2**10, 'MIB': 2**20,
          'GIB': 2**30}


def parse_size(text: str) -> int:
  """'5GB' -> 5_000_000_000 (also KB/MB, KiB/MiB/GiB, or plain bytes)."""
  m = re.fullmatch(r'\s*([0-9.]+)\s*([A-Za-z]*)\s*', text)
  if not m or m.group(2).upper() not in _UNITS:
    raise argparse.ArgumentTypeError(f'{text!r} is not a size like 5GB, 500MB or 1000000')
  return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m train.convert', description=__doc__)
  sub = parser.add_subparsers(dest='command', required=True)
  imp = sub.add_parser('from-hf', help='Hugging Face folder -> meshlm run folder')
  imp.add_argument('hf_dir')
  imp.add_argument('out_dir')
  imp.add_argument('--param_dtype', default=None, help='default: the dtype config.json declares')
  imp.add_argument('--compute_dtype', default=None, help='default: the param dtype')
  imp.add_argument('--allow_sliding_window', action='store_true',
                   help='convert a sliding-window model; exact only up to the window length')
  exp = sub.add_parser('to-hf', help='meshlm checkpoint -> Hugging Face folder')
  exp.add_argument('checkpoint', help='workdir, its checkpoints/ folder, or checkpoints/<step>')
  exp.add_argument('out_dir')
  exp.add_argument('--config', default=None, help='experiment file (default: workdir/config.json)')
  exp.add_argument('--dtype', default=None, help='cast the weights (default: as stored)')
  exp.add_argument('--max_shard_size', type=parse_size, default=parse_size('5GB'))
  args = parser.parse_args(argv)
  try:
    if args.command == 'from-hf':
      root = from_hf(args.hf_dir, args.out_dir, param_dtype=args.param_dtype,
                     compute_dtype=args.compute_dtype,
                     allow_sliding_window=args.allow_sliding_window)
      print(f'wrote {args.out_dir}; start a run from it with --config.train.init_from={root}')
    else:
      to_hf(args.checkpoint, args.out_dir, config=args.config, dtype=args.dtype,
            max_shard_bytes=args.max_shard_size)
      print(f'wrote {args.out_dir}')
  except (hf_layout.ConvertError, safetensors_io.FormatError, ConfigError, FileNotFoundError,
          FileExistsError, KeyError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  progress = logging.getLogger('meshlm.convert')
  progress.addHandler(logging.StreamHandler())  # Its default format is the message alone.
  progress.setLevel(logging.INFO)
  progress.propagate = False
  sys.exit(main())
