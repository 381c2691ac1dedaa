"""The command line of `python -m train` and `python -m train.posttrain`.

`--config FILE[:ARG]` names an experiment file (its get_config(), or get_config(ARG));
`--config.KEY=VALUE` overrides are parsed as the type of the value they replace; absl parses the
rest (`parse_flags`). A bad input (BAD_INPUT: config, data, tokenizer, a non-finite step, a lost
peer) ends `main` with one line `error: ...` naming the key, flag or file:line, never a traceback.
"""

import ast
import sys

import ml_collections
from absl import app, flags

from data import builders, chat, readers, tokenizer
from data import config as data_config
from model.config import ConfigError
from train import compilation_cache, distributed, loop
from train import config as config_lib

BAD_INPUT = (ConfigError, data_config.DataConfigError, readers.BadInputError, FileNotFoundError,
             tokenizer.TokenizerError, chat.TemplateError, builders.PrepareError,
             loop.NonFiniteError)


def main(run, argv: list[str]) -> None:
  """run(config, workdir) with the config of `argv` (what parse_flags left) and --workdir."""
  compilation_cache.enable()
  try:
    with distributed.exit_on_lost_peer(flags.FLAGS.workdir):  # A lost process: one line, no hang.
      run(from_args(argv[1:]), flags.FLAGS.workdir)
  except BAD_INPUT as e:
    sys.exit(f'error: {e}')


def parse_flags(argv: list[str]) -> list[str]:
  """absl `flags_parser` of the CLIs: absl parses every flag but `--config` and its overrides,
  which come back as ['--config=FILE', '--config.key=value', ...] (after argv[0]) for main()."""
  ours, rest, args = [argv[0]], [argv[0]], iter(argv[1:])
  for arg in args:
    if arg == '--config' or (arg.startswith('--config.') and '=' not in arg):
      ours.append(f'{arg}={next(args, "")}')
    elif arg.startswith(('--config=', '--config.')):
      ours.append(arg)
    else:
      rest.append(arg)
  app.parse_flags_with_usage(rest)
  return ours


def from_args(args: list[str]) -> ml_collections.ConfigDict:
  """The config of ['--config=FILE[:ARG]', '--config.key=value', ...] (see parse_flags)."""
  pairs = [arg[2:].partition('=')[::2] for arg in args]  # (key, value); the last --config wins.
  spec = dict(pairs).get('config', '')
  if not spec:
    raise ConfigError('--config FILE is required: an experiment file with a get_config()')
  config = config_lib.load_experiment(spec)
  for key, value in pairs:
    if key != 'config':
      override(config, key[len('config.'):], value)
  return config


def override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
  """Sets `config.<key>` from command-line `text`, parsed as the type of the value it replaces.
  New keys are accepted only in train.config.FREE_FORM sections (e.g. sharding_rules.length=tensor)."""
  flag = f'--config.{key}={text}'
  *path, leaf = key.split('.')
  section = config
  for i, name in enumerate(path):
    if not isinstance(section.get(name), ml_collections.ConfigDict):
      raise ConfigError(f'{flag}: {config_lib.unknown_key(".".join(path[:i + 1]), section.keys())}')
    section = section[name]
  parent = '.'.join(path)
  if leaf not in section and not any(parent == f or parent.startswith(f + '.')
                                     for f in config_lib.FREE_FORM):
    raise ConfigError(f'{flag}: {config_lib.unknown_key(key, section.keys())}')
  old = section.get(leaf)
  if isinstance(old, ml_collections.ConfigDict):
    raise ConfigError(f'{flag}: {key} is a section; set one of its keys ({", ".join(old.keys())})')
  try:
    if isinstance(old, bool):
      value = {'true': True, '1': True, 'false': False, '0': False}[text.lower()]
    elif isinstance(old, (int, float, str)):
      value = type(old)(text)
    else:  # None, tuples, lists: a Python literal; a bare word in a free-form section.
      try:
        value = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        if old is not None:
          raise
        value = text
      value = tuple(value) if isinstance(old, tuple) and isinstance(value, list) else value
    section[leaf] = value
  except (ValueError, SyntaxError, TypeError, KeyError) as e:
    raise ConfigError(f'{flag}: expected a {type(old).__name__} (the current value is {old!r})') from e


