"""python -m train --config experiments/<name>.py --workdir DIR [--config.key=value ...]"""

import sys

from train import hugepages

if __name__ == '__main__':
  hugepages.reexec()  # Before JAX allocates anything; see train/hugepages.py.

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment file with a get_config().',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard events and caches go here.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  from model.config import ConfigError
  from train import compilation_cache, distributed, loop
  from data import builders, chat, config, readers, tokenizer
  compilation_cache.enable()
  try:
    with distributed.exit_on_lost_peer(_WORKDIR.value):  # A lost process: one line, no hang.
      loop.run(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, loop.NonFiniteError, config.DataConfigError, readers.BadInputError,
          tokenizer.TokenizerError, chat.TemplateError, builders.PrepareError) as e:
    sys.exit(f'error: {e}')  # Bad input or config: one line naming the key or file:line.


if __name__ == '__main__':
  app.run(main)
