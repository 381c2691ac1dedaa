"""Loss and throughput over steps as a PNG in the workdir, for people without TensorBoard.

    python -m train.plots WORKDIR      # (re)writes WORKDIR/curves.png

The loop calls `write(workdir)` at the end of every run: two panels over the steps of
`workdir/metrics.jsonl` (train and eval loss; training tokens/s). matplotlib (the `plot` extra)
is optional and used through its object API (no pyplot, no display needed).
"""

import logging
import os
import sys

from data import readers

log = logging.getLogger('meshlm')

FILENAME = 'curves.png'
CURVES = (  # (metric, label, panel, line style)
    ('loss', 'train loss', 'loss', {}),
    ('eval/loss', 'eval loss', 'loss', {'marker': 'o', 'markersize': 4}),
    ('perf/tokens_per_sec', 'tokens/s', 'tokens/s', {'color': 'tab:green'}))


def read_metrics(path: str) -> dict[str, tuple[list[int], list[float]]]:
  """{tag: (steps ascending, values)} from a metrics.jsonl; the last record of a step wins."""
  by_tag: dict[str, dict[int, float]] = {}
  for where, record in readers.iter_jsonl(path, readers.BadInput()):  # Bad lines raise.
    if not isinstance(record.get('step'), int):
      raise ValueError(f'{where}: not a metrics record with a step')
    step = record.pop('step')
    for tag, value in record.items():
      by_tag.setdefault(tag, {})[step] = float(value)
  return {tag: (sorted(v), [v[s] for s in sorted(v)]) for tag, v in by_tag.items()}


def write(workdir: str) -> str | None:
  """Draws the curves of `workdir` into workdir/curves.png and returns its path, or None with a
  log line (no matplotlib, nothing logged, an unreadable metrics file)."""
  try:
    from matplotlib.figure import Figure
  except ImportError:
    log.info('matplotlib is not installed (pip install "meshlm[plot]"): no %s', FILENAME)
    return None
  source = os.path.join(workdir, 'metrics.jsonl')
  try:
    metrics = read_metrics(source) if os.path.exists(source) else {}
  except (OSError, ValueError) as e:
    log.warning('no %s: %s', FILENAME, e)
    return None
  if 'loss' not in metrics:
    log.info('no train loss logged in %s yet: no %s', source, FILENAME)
    return None
  path = os.path.join(workdir, FILENAME)
  fig = Figure(figsize=(8, 6.5))
  axes = dict(zip(('loss', 'tokens/s'), fig.subplots(2, 1, sharex=True)))
  for tag, label, ax, style in CURVES:
    if tag in metrics:
      axes[ax].plot(*metrics[tag], label=label, **style)
  axes['loss'].set_ylabel('loss (nats / token)')
  axes['loss'].legend()
  axes['tokens/s'].set(ylabel='training tokens / s', xlabel='step')
  for ax in axes.values():
    ax.grid(alpha=0.3)
  fig.suptitle(os.path.basename(os.path.abspath(workdir)))
  fig.tight_layout()
  fig.savefig(path + '.tmp.png', dpi=100)
  os.replace(path + '.tmp.png', path)
  return path


def main(argv=None) -> int:
  args = sys.argv[1:] if argv is None else argv
  if len(args) != 1:
    print('usage: python -m train.plots WORKDIR', file=sys.stderr)
    return 2
  logging.basicConfig(level=logging.INFO, format='%(message)s')
  path = write(args[0])
  if path:
    print(path)
  return 0 if path else 1


if __name__ == '__main__':
  sys.exit(main())
