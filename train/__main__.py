"""python -m train --config experiments/<name>.py --workdir DIR [--config.key=value ...]"""

from train import hugepages

if __name__ == '__main__':
  hugepages.reexec()  # Before JAX allocates anything; see train/hugepages.py.

from absl import app, flags  # noqa: E402

from train import cli, loop  # noqa: E402

flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard events and caches go here.')
flags.mark_flags_as_required(['workdir'])


if __name__ == '__main__':
  app.run(lambda argv: cli.main(loop.run, argv), flags_parser=cli.parse_flags)
