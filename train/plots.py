"""Loss and throughput over steps as a PNG in the workdir, for people without TensorBoard.

    python -m train.plots WORKDIR      # (re)writes WORKDIR/curves.png

The loop calls `write(workdir)` at the end of every run. It reads `workdir/metrics.jsonl`, which
holds every call of a run (resumes append to it; a step logged twice keeps its last value),
and draws two panels over steps: train and eval loss, and training tokens/s. The first
throughput point includes compilation. matplotlib (the `plot` extra) is optional: without it,
`write` logs one line and returns None. The figure is drawn with matplotlib's object API (no
pyplot), so no display is needed and a notebook's own plotting backend is left alone.
"""

import json
import logging
import os
import sys

log = logging.getLogger('meshlm')

FILENAME = 'curves.png'
CURVES = (('loss', 'train loss'), ('eval/loss', 'eval loss'), ('perf/tokens_per_sec', 'tokens/s'))


def read_metrics(path: str) -> dict[str, tuple[list[int], list[float]]]:
  """{tag: (steps ascending, values)} from a metrics.jsonl; the last record of a step wins."""
  by_tag: dict[str, dict[int, float]] = {}
  with open(path) as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        step = int(record.pop('step'))
      except (ValueError, KeyError) as e:
        raise ValueError(f'{path}:{line_no}: not a metrics record with a step ({e})') from None
      for tag, value in record.items():
        by_tag.setdefault(tag, {})[step] = float(value)
  return {tag: (sorted(v), [v[s] for s in sorted(v)]) for tag, v in by_tag.items()}


def write(workdir: str, path: str | None = None) -> str | None:
  """Draws the curves of `workdir` into `path` (default workdir/curves.png); returns the path,
  or None (with a log line) when matplotlib is missing, nothing was logged yet, or the
  metrics file cannot be read: a finished run never fails for its plot."""
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
  path = path or os.path.join(workdir, FILENAME)
  fig = Figure(figsize=(8, 6.5))
  ax_loss, ax_tps = fig.subplots(2, 1, sharex=True)
  for tag, label in CURVES[:2]:
    if tag in metrics:
      steps, values = metrics[tag]
      ax_loss.plot(steps, values, marker='o' if tag.startswith('eval') else None, markersize=4,
                   label=label)
  ax_loss.set_ylabel('loss (nats / token)')
  ax_loss.legend()
  ax_loss.grid(alpha=0.3)
  if CURVES[2][0] in metrics:
    steps, values = metrics[CURVES[2][0]]
    ax_tps.plot(steps, values, color='tab:green', label=CURVES[2][1])
  ax_tps.set_ylabel('training tokens / s')
  ax_tps.set_xlabel('step')
  ax_tps.grid(alpha=0.3)
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
