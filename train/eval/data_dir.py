"""Where the benchmark files live: an argument, env SHARED_DATA, or ../shared/data from the repo."""

import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[2]


def resolve(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The data folder; raises FileNotFoundError naming every place it looked."""
  if data_dir is not None:
    path = pathlib.Path(data_dir)
  elif os.environ.get('SHARED_DATA'):
    path = pathlib.Path(os.environ['SHARED_DATA'])
  else:
    path = REPO.parent / 'shared' / 'data'
  if not path.is_dir():
    raise FileNotFoundError(f'benchmark data folder {path} does not exist; pass data_dir or set '
                            f'env SHARED_DATA (default: ../shared/data from the repo root)')
  return path
