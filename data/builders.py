"""TFDS builders prepared to array_record without TensorFlow, and readers of what they write.

`LocalCorpus`: local text or JSON-lines files as a tfds dataset of `{'text'}` records in splits
'train' and 'eval'; preparing it runs hygiene (dedup included) and the bad-input policy over the
whole corpus, counts kept in its metadata. Catalogued datasets: `tfds.data_source`; the
`TF_FREE_PREPARERS` (tiny_shakespeare) need no TensorFlow (tfds's download manager, manual dir).
"""

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from typing import Any

import ml_collections
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.datasets.tiny_shakespeare import (
    tiny_shakespeare_dataset_builder as tiny_shakespeare)

from data import hygiene as hygiene_lib
from data import readers

FORMATS = ('text', 'jsonl')
LOCAL_SPLITS = ('train', 'eval')


class PrepareError(RuntimeError):
  """A dataset that is not prepared or cannot be; the message says what to run."""


class LocalCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A local corpus; its config name is the corpus name and a fingerprint of files and spec."""

  VERSION = tfds.core.Version('1.0.0')
  name = 'meshlm_local_corpus'

  def __init__(self, *, spec: dict[str, Any], **kwargs):
    self._spec = dict(spec)
    if self._spec['format'] not in FORMATS:
      raise ValueError(f'local corpus format {self._spec["format"]!r} is not one of {FORMATS}')
    self._paths = readers.expand(self._spec['path'], 'local corpus path')
    fingerprint = hashlib.sha256(json.dumps(self._spec, sort_keys=True).encode())
    for p in self._paths:  # Name, size and modification time of every file.
      st = os.stat(p)
      fingerprint.update(f'{p}:{st.st_size}:{st.st_mtime_ns}'.encode())
    config_name = f'{self._spec["name"]}_{fingerprint.hexdigest()[:12]}'
    super().__init__(config=tfds.core.BuilderConfig(name=config_name), **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=f'Local corpus {self._spec["path"]}',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        metadata=tfds.core.MetadataDict())

  def _documents(self, bad: readers.BadInput):
    spec = self._spec
    if spec['format'] == 'text':
      return readers.iter_text(spec['path'], spec['unit'], bad)
    return readers.iter_jsonl_text(spec['path'], spec['text_field'], bad)

  def _bad_input(self, policy: str, log: bool = True) -> readers.BadInput:
    return readers.BadInput(policy, log, self._spec['max_doc_chars'], self._spec['long_docs'])

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    spec = self._spec
    bad = self._bad_input(spec['on_bad_input'])
    clean = hygiene_lib.Hygiene(spec['hygiene'])
    kept = [where for where, text in self._documents(bad) if clean.check(text) is not None]
    assignment = dict.fromkeys(kept, 'train')
    if spec['eval_fraction'] > 0 and len(kept) >= 2:  # Every k-th held out, at least one.
      every = min(len(kept), max(1, round(1 / spec['eval_fraction'])))
      assignment.update(dict.fromkeys(kept[every - 1::every], 'eval'))
    self.info.metadata.update({'bad_input': dict(bad.counts), 'hygiene': dict(clean.counts),
                               'files': len(self._paths)})
    present = set(assignment.values())  # tfds cannot write an empty split
    return {split: self._generate_examples(assignment, split)
            for split in LOCAL_SPLITS if split in present}

  def _generate_examples(self, assignment: dict[str, str], split: str):
    normalize = self._spec['hygiene'].get('normalize', '')
    for where, text in self._documents(self._bad_input('skip', log=False)):
      if assignment.get(where) == split:
        yield where, {'text': hygiene_lib.unicodedata.normalize(normalize, text)
                                 if normalize else text}


def local_spec(entry: ml_collections.ConfigDict, data_cfg: ml_collections.ConfigDict) -> dict:
  """The JSON-able description of a local `source_entry` that identifies its prepared data."""
  return {'name': entry.name or 'corpus', 'path': entry.path, 'format': entry.file_format,
          'unit': entry.unit, 'text_field': entry.text_field,
          'eval_fraction': float(entry.eval_fraction), 'hygiene': data_cfg.hygiene.to_dict(),
          'on_bad_input': data_cfg.on_bad_input, 'max_doc_chars': int(data_cfg.max_doc_chars),
          'long_docs': data_cfg.long_docs}


@contextlib.contextmanager
def _quiet_tfds():
  """tfds without its progress output on stdout (it goes to stderr) and without the
  `tempfile.mkdtemp('tfds')` folders it never removes (they go into one of ours, removed)."""
  tfds.disable_progress_bar()
  with tempfile.TemporaryDirectory(prefix='meshlm-tfds-') as tmp:
    saved, tempfile.tempdir = tempfile.tempdir, tmp
    try:
      with contextlib.redirect_stdout(sys.stderr):
        yield
    finally:
      tempfile.tempdir = saved


def prepare_local(spec: dict[str, Any], data_dir: str) -> tfds.core.DatasetBuilder:
  """Prepares (once) the local corpus `spec` under `data_dir`; returns a builder to read it."""
  with _quiet_tfds():
    builder = LocalCorpus(spec=spec, data_dir=data_dir, file_format='array_record')
    if not builder.is_prepared():
      builder.download_and_prepare()
  return tfds.builder_from_directory(builder.data_dir)


class _TinyShakespeare(tiny_shakespeare.Builder, skip_registration=True):
  """tiny_shakespeare's builder with a `_split_generators` that needs no TensorFlow."""

  name = 'tiny_shakespeare'
  code_path = tiny_shakespeare.Builder.code_path  # Its checksums and metadata, not ours.
  URL = ('https://raw.githubusercontent.com/karpathy/char-rnn/master/data/'
         'tinyshakespeare/input.txt')

  @classmethod
  def _get_pkg_dir_path(cls):
    return tiny_shakespeare.Builder._get_pkg_dir_path()  # pylint: disable=protected-access

  def _split_generators(self, dl_manager):
    text = epath.Path(dl_manager.download(self.URL)).read_text(encoding='utf-8')
    i = int(len(text) * 0.9)  # The same 90/5/5 cut as the catalogued builder.
    j = i + int((len(text) - i) * 0.5)
    splits = {'train': text[:i], 'validation': text[i:j], 'test': text[j:]}
    return [tfds.core.SplitGenerator(name=name, gen_kwargs={'split_key': name, 'split_text': t})
            for name, t in splits.items()]


TF_FREE_PREPARERS = {'tiny_shakespeare': _TinyShakespeare}


def prepare_tfds(name: str, data_dir: str, manual_dir: str = '') -> None:
  """Prepares catalogued dataset `name` as array_record under `data_dir` (once)."""
  base = name.split(':')[0].split('/')[0]
  cls = TF_FREE_PREPARERS.get(base)
  kwargs = {'data_dir': data_dir, 'file_format': 'array_record'}
  config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
  try:
    with _quiet_tfds():
      builder = cls(**kwargs) if cls and base == name else tfds.builder(name, **kwargs)
      if not builder.is_prepared():
        builder.download_and_prepare(download_config=config)
  except ModuleNotFoundError as e:
    raise PrepareError(f'preparing tfds dataset {name!r} needs {e.name}, which is not '
                       f'installed; prepare it where it is and point data_dir there') from e
  except Exception as e:  # Download failures come in many types; say what to do.
    raise PrepareError(f'preparing tfds dataset {name!r} under {data_dir} failed: {e}. '
                       f'Offline, put its files in a manual dir (manual_dir)') from e


def tfds_source(name: str, split: str, data_dir: str, manual_dir: str = '', prepare: bool = True):
  """The array_record data source of a catalogued dataset split (prepared first if asked)."""
  if prepare:
    prepare_tfds(name, data_dir, manual_dir)
  try:
    with _quiet_tfds():
      return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises assorted types for "not prepared" and "no such split".
    raise PrepareError(f'tfds dataset {name!r} split {split!r} cannot be read from '
                       f'{data_dir}: {e}. Prepare it with `python -m data.prepare tfds '
                       f'--name {name} --data-dir {data_dir}`') from e
