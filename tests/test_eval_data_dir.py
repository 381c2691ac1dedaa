"""The data folder comes from the argument, then env SHARED_DATA, then ../shared/data."""

import pytest

from train.eval import data_dir


def test_argument_then_env_then_default(tmp_path, monkeypatch):
  (tmp_path / 'a').mkdir()
  (tmp_path / 'b').mkdir()
  monkeypatch.setenv('SHARED_DATA', str(tmp_path / 'b'))
  assert data_dir.resolve(tmp_path / 'a') == tmp_path / 'a'
  assert data_dir.resolve() == tmp_path / 'b'
  monkeypatch.delenv('SHARED_DATA')
  default = data_dir.REPO.parent / 'shared' / 'data'
  if default.is_dir():
    assert data_dir.resolve() == default
  else:
    with pytest.raises(FileNotFoundError, match='shared/data'):
      data_dir.resolve()


def test_missing_folder_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere'):
    data_dir.resolve(tmp_path / 'nowhere')
