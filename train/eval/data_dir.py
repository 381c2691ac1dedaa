"""Where benchmark files live (argument, env SHARED_DATA, ../shared/data) and how they are read."""

import gzip
import json
import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[2]


def resolve(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The data folder; raises FileNotFoundError naming every place it looked."""
  default = os.environ.get('SHARED_DATA') or REPO.parent / 'shared' / 'data'
  path = pathlib.Path(default if data_dir is None else data_dir)
  if not path.is_dir():
    raise FileNotFoundError(f'benchmark data folder {path} does not exist; pass data_dir or set '
                            f'env SHARED_DATA (default: ../shared/data from the repo root)')
  return path


def read_jsonl(path: pathlib.Path, kind: str, keys: tuple[str, ...]) -> list[dict]:
  """JSON-lines rows (.gz: gzip) with string `keys`; a ValueError (file:line) if bad or empty."""
  rows = []
  with (gzip.open if path.suffix == '.gz' else open)(path, 'rt', encoding='utf-8') as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{line_no}: invalid JSON ({e.msg})') from None
      if missing := [k for k in keys if not isinstance(row.get(k), str)]:
        raise ValueError(f'{path}:{line_no}: {kind} row needs string {missing}')
      rows.append(row)
  if not rows:
    raise ValueError(f'{path}: no {kind} rows')
  return rows
