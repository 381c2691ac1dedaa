"""Where benchmark files live (argument, env SHARED_DATA, ../shared/data) and how they are read."""

import os
import pathlib

from data import readers

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
  bad = readers.BadInput()  # Raises data/readers.py's BadInputError naming file:line.
  rows = [row for where, row in readers.iter_jsonl(str(path), bad)
          if all(readers.get_field(row, k, where, bad) is not None for k in keys)]
  if not rows:
    raise ValueError(f'{path}: no {kind} rows')
  return rows
