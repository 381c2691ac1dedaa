"""Prepare datasets to array_record ahead of training (make_iterator also does it on demand).

  python -m data.prepare tfds --name tiny_shakespeare --data-dir D [--manual-dir M]
  python -m data.prepare local --path 'corpus/*.txt' --data-dir D [flags: see --help]

`local` takes the keys of a `kind='local'` sources entry and the corpus keys of `config.data`
(hygiene, on_bad_input, max_doc_chars, long_docs) as flags, and prints where the corpus went and
its counts. Training on it with the same settings and `tfds_data_dir` finds it by fingerprint.
"""

import argparse
import json
from typing import Sequence

from data import builders, hygiene, readers
from data import config as data_config


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog='python -m data.prepare', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  t = sub.add_parser('tfds', help='a catalogued tfds dataset')
  t.add_argument('--name', required=True)
  t.add_argument('--data-dir', required=True)
  t.add_argument('--manual-dir', default='')
  loc = sub.add_parser('local', help='local text or JSON-lines files')
  loc.add_argument('--data-dir', required=True)
  data_defaults = data_config.default_config()
  entry_keys = {k: v for k, v in data_config.source_entry('local').items()
                if k not in ('kind', 'format', 'weight')}  # path, file_format, unit, ...
  knobs = {k: data_defaults[k] for k in ('on_bad_input', 'max_doc_chars', 'long_docs')}
  knobs.update(data_defaults.hygiene.to_dict())  # The config.data keys of a corpus.
  choices = {'file_format': builders.FORMATS, 'unit': readers.UNITS,
             'on_bad_input': readers.ON_BAD_INPUT, 'long_docs': readers.LONG_DOCS,
             'normalize': hygiene.NORMALIZATIONS}
  for key, value in {**entry_keys, **knobs}.items():
    flag = '--' + key.replace('_', '-')
    if isinstance(value, bool):
      loc.add_argument(flag, action='store_true')
    else:
      loc.add_argument(flag, type=type(value), default=value, choices=choices.get(key),
                       required=key == 'path', help='a file or a glob' if key == 'path' else None)
  args = parser.parse_args(argv)
  try:
    if args.command == 'tfds':
      builders.prepare_tfds(args.name, args.data_dir, args.manual_dir)
      print(f'prepared tfds {args.name} under {args.data_dir}')
      return
    data_cfg = data_defaults
    for key in knobs:
      (data_cfg.hygiene if key in data_cfg.hygiene else data_cfg)[key] = getattr(args, key)
    entry = data_config.source_entry('local', **{k: getattr(args, k) for k in entry_keys})
    builder = builders.prepare_local(builders.local_spec(entry, data_cfg), args.data_dir)
  except (builders.PrepareError, readers.BadInputError, FileNotFoundError, ValueError) as e:
    parser.exit(2, f'error: {e}\n')
  splits = {name: info.num_examples for name, info in builder.info.splits.items()}
  report = {'dir': str(builder.data_dir), 'splits': splits, **(builder.info.metadata or {})}
  print(json.dumps(report, indent=1, default=str))


if __name__ == '__main__':
  main()
