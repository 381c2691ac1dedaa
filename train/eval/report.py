"""Evaluation results: one JSON file for machines, one table for people.

Each task result is a dict with at least `task` (str) and `metrics` (name -> float); the rest
(per-subject, per-problem, config, ...) goes to the JSON file as is.
"""

import json
import os
import pathlib
import time


def _check(results: list[dict]):
  for i, r in enumerate(results):
    if not isinstance(r.get('task'), str) or not isinstance(r.get('metrics'), dict):
      raise ValueError(f'result #{i} needs a "task" string and a "metrics" dict, '
                       f'got keys {list(r)}')


def write_json(results: list[dict], path: str | os.PathLike,
               extra: dict | None = None) -> pathlib.Path:
  """Writes {"created", "results", **extra} to `path` atomically; returns the path."""
  _check(results)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  document = {'created': time.strftime('%Y-%m-%dT%H:%M:%S%z'), **(extra or {}), 'results': results}
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(document, indent=1, allow_nan=False) + '\n', encoding='utf-8')
  os.replace(tmp, path)
  return path


def read_json(path: str | os.PathLike) -> list[dict]:
  document = json.loads(pathlib.Path(path).read_text(encoding='utf-8'))
  if 'results' not in document:
    raise ValueError(f'{path}: no "results" key; not an evaluation report')
  _check(document['results'])
  return document['results']


def format_table(results: list[dict], per_subject: bool = False) -> str:
  """Rows `task | metric | value | n`; with per_subject, MMLU subjects follow their task row."""
  _check(results)
  rows = [('task', 'metric', 'value', 'n')]
  for r in results:
    for name, value in r['metrics'].items():
      rows.append((r['task'], name, f'{100 * value:.2f}%',
                   str(r.get('count', r.get('num_problems', '')))))
    if per_subject:
      for subject, s in r.get('per_subject', {}).items():
        rows.append((f'  {subject}', 'accuracy', f'{100 * s["accuracy"]:.2f}%', str(s['count'])))
  widths = [max(len(row[i]) for row in rows) for i in range(4)]
  lines = [' | '.join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
  lines.insert(1, '-+-'.join('-' * w for w in widths))
  return '\n'.join(lines)
