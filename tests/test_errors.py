"""Bad input of every kind ends in one clear line naming the flag, key, file or file:line, never a
traceback; static checks fail before anything is built or compiled; bad data is named or counted.

Most cases run in-process (the command-line parser, `validate`, the data readers and pipeline);
a few representative ones go through the real CLIs (one JAX start-up each).
"""

import gzip
import json
import os
import pathlib
import re
import tempfile
import time
import tracemalloc

import jax
import pytest

from data import builders, corpus, pipeline, readers
from data import config as data_config
from data import tokenizer as tokenizer_lib
from model.config import ConfigError
from model.sharding import make_rules
from tests.test_cli import REPO, run_cli
from train import cli
from train import config as config_lib
from train.eval import sandbox
from train.posttrain import config as pt_config

TINY = 'experiments/tiny_dense.py'
WORDS = ('apple', 'pear', 'plum', 'fig', 'kiwi', 'lime', 'date')


def _config(*overrides: str, experiment: str = TINY):
  return cli.from_args([f'--config={REPO / experiment}', *(f'--config.{o}' for o in overrides)])


def _validate(config):
  return config_lib.validate(config, jax.device_count())


def _text(n_words: int, sep: str = ' ') -> str:
  return sep.join(WORDS[(i * 7 + i // 5) % len(WORDS)] for i in range(n_words))


EXPERIMENTS = {  # name -> (file body, message; {path} is the file)
    'syntax': ('from train.config import defaults\n\ndef get_config(:\n  return defaults()\n',
               '{path}:3: invalid syntax'),
    'raises': ('from train.config import defaults\n\n\ndef get_config():\n  c = defaults()\n'
               '  raise ValueError("no corpus here")\n',
               '{path}:6: loading the experiment raised ValueError: no corpus here'),
    'import_fails': ('import no_such_module\n', "{path}:1: loading the experiment raised "
                     "ModuleNotFoundError: No module named 'no_such_module'"),
    'no_get_config': ('X = 1\n', '{path}: the experiment file defines no get_config()'),
    'not_a_config': ('def get_config():\n  return {}\n', '{path}: get_config() returned a dict'),
}


@pytest.mark.parametrize('name', EXPERIMENTS)
def test_experiment_file_errors_name_file_and_line(tmp_path, name):
  body, message = EXPERIMENTS[name]
  path = tmp_path / f'{name}.py'
  path.write_text(body)
  with pytest.raises(ConfigError) as e:
    cli.from_args([f'--config={path}'])
  assert str(e.value).startswith(message.format(path=path)), e.value
  with pytest.raises(ConfigError, match='no such experiment file'):
    cli.from_args([f'--config={tmp_path / "missing.py"}'])
  with pytest.raises(ConfigError, match='--config FILE is required'):
    cli.from_args(['--config.train.steps=3'])


@pytest.mark.parametrize('override, message', [
    ('train.stepz=3', "--config.train.stepz=3: unknown config key 'train.stepz'; did you mean "
                      "'steps'?"),
    ('trainz.steps=3', "--config.trainz.steps=3: unknown config key 'trainz'; did you mean "
                       "'train'?"),
    ('train.steps=many', '--config.train.steps=many: expected a int (the current value is 200)'),
    ('train.progress=maybe', '--config.train.progress=maybe: expected a bool'),
    ('train=3', '--config.train=3: train is a section; set one of its keys'),
])
def test_command_line_errors_name_the_flag(override, message):
  with pytest.raises(ConfigError) as e:
    _config(override)
  assert str(e.value).startswith(message), e.value


def test_sharding_rules_from_the_command_line():
  """The README's `--config.sharding_rules.length=tensor`: new keys of that free-form section."""
  config = _config('sharding_rules.length=tensor', "sharding_rules.batch=('data','fsdp')",
                   'sharding_rules.act_embed=None', 'mesh.tensor=2')
  _validate(config)
  rules = make_rules(config.sharding_rules.to_dict())
  assert (rules['length'], rules['batch'], rules['act_embed']) == ('tensor', ('data', 'fsdp'), None)
  assert _config('train.steps=7', 'optim.peak_lr=1e-3', 'train.progress=false').train.progress is False


def test_a_source_given_whole_on_the_command_line_takes_the_entry_defaults(tmp_path):
  path = tmp_path / 'sft.jsonl'
  path.write_text(json.dumps({'prompt': 'Say hi.', 'response': 'hi'}) + '\n')
  config = _config('data.source=mine', f"data.sources.mine={{'kind': 'jsonl', 'format': 'sft', "
                   f"'path': '{path}'}}")
  [(name, entry)] = data_config.selected(config.data)
  assert name == 'mine' and (entry.sft_format, entry.eval_fraction) == ('auto', 0.05)


@pytest.mark.parametrize('override, message', [
    ('optim.peak_lr=-0.001', 'optim.peak_lr=-0.001 must be > 0'),
    ('optim.peak_lr=0', 'optim.peak_lr=0.0 must be > 0'),
    ('optim.b1=-0.1', 'optim.b1=-0.1 must be in [0, 1)'),
    ('optim.b2=1.5', 'optim.b2=1.5 must be in [0, 1)'),
    ('optim.b2=1', 'optim.b2=1.0 must be in [0, 1)'),
    ('optim.eps=0', 'optim.eps=0.0 must be > 0'),
    ('optim.weight_decay=-0.1', 'optim.weight_decay=-0.1 must be >= 0'),
    ('optim.clip_norm=-1', 'optim.clip_norm=-1.0 must be >= 0 (0: no clipping)'),
    ('optim.final_lr_frac=2', 'optim.final_lr_frac=2.0 must be in [0, 1]'),
    ('train.init_from=/nonexistent/run', 'train.init_from=/nonexistent/run: no such directory'),
    ('sharding_rules.lengthz=tensor', 'sharding_rules.lengthz: unknown logical axis'),
    ('sharding_rules.length=tensr', "sharding_rules.length='tensr': tensr is not a mesh axis"),
    ('model.num_heads=3', 'must divide num_heads=3'),
    ('data.sources.embedded.kind=s3', 'config.data.sources.embedded.kind'),
    ('data.long_docs=drop', 'config.data.long_docs'),
    ('data.sources.embedded.pathz=x', "config.data.sources.embedded: unknown key(s) ['pathz']"),
])
def test_static_checks_name_the_key(override, message):
  with pytest.raises(ConfigError) as e:
    _validate(_config(override))
  assert message in str(e.value)


def test_posttrain_ranges_name_the_key(tmp_path):
  config = _config('train.init_from=' + str(tmp_path), 'ppo.reward_model=' + str(tmp_path),
                   'ppo.critic_lr=-1e-5', 'optim.b2=1.0', experiment='experiments/tiny_ppo.py')
  with pytest.raises(ConfigError, match=r'optim.b2=1.0 must be in \[0, 1\)'):
    pt_config.validate(config, jax.device_count())
  config.optim.b2 = 0.95
  with pytest.raises(ConfigError, match='ppo.critic_lr=-1e-05 must be > 0'):
    pt_config.validate(config, jax.device_count())


def test_clip_norm_zero_is_off_and_valid():
  _validate(_config('optim.clip_norm=0', 'optim.b1=0'))


def _with_source(config, kind: str, path: str, fmt: str = 'text'):
  config.data.sources['mine'] = data_config.source_entry(kind, fmt, path=path)
  config.data.source = 'mine'
  config.data.packing = 'pad' if fmt == 'sft' else config.data.packing
  return config


@pytest.mark.parametrize('kind, fmt, path, message', [
    ('local', 'text', '{tmp}/corpus/*.txt', "sources.mine.path: a file or glob '{tmp}/corpus/*.txt' "
                                            'matches no file'),
    ('local', 'text', '{tmp}', "sources.mine.path: a file or glob '{tmp}' is a directory; name a "
                               "file or a glob such as '{tmp}/*.txt'"),
    ('jsonl', 'sft', '{tmp}/sft.jsonl', "sources.mine.path: a file or glob '{tmp}/sft.jsonl' "
                                        'matches no file'),
])
def test_data_paths_are_checked_statically(tmp_path, kind, fmt, path, message):
  config = _with_source(_config(), kind, path.format(tmp=tmp_path), fmt)
  with pytest.raises(ConfigError) as e:
    _validate(config)
  assert message.format(tmp=tmp_path) in str(e.value)


# Through the CLIs: one line, non-zero, no traceback, nothing built (config.json is written right
# after validation; 'parameters:' once the state exists), an existing checkpoint step untouched.
CLI_CASES = {
    'unknown_key': (['--config.train.stepz=3'], "unknown config key 'train.stepz'", True),
    'syntax_error': (['--config', '{tmp}/bad.py'], '{tmp}/bad.py:3: invalid syntax', True),
    'init_from': (['--config.train.init_from={tmp}/no_run'], 'train.init_from={tmp}/no_run: no such '
                  'directory', True),
    'corpus_dir': (['--config', '{tmp}/dir_corpus.py'], "'{tmp}' is a directory", True),
    'truncated_gz': (['--config', '{tmp}/gz_corpus.py'], '{tmp}/c.txt.gz:', False),
    'posttrain': (['--config.trainz.steps=3'], "unknown config key 'trainz'", True),
}


def _write_experiments(tmp: pathlib.Path):
  (tmp / 'bad.py').write_text(EXPERIMENTS['syntax'][0])
  source = ('from experiments import tiny_dense\nfrom data.config import source_entry\n\n'
            'def get_config():\n  c = tiny_dense.get_config()\n'
            "  c.data.sources['mine'] = source_entry('local', path={path!r})\n"
            "  c.data.source = 'mine'\n  return c\n")
  (tmp / 'dir_corpus.py').write_text(source.format(path=str(tmp)))
  (tmp / 'gz_corpus.py').write_text(source.format(path=str(tmp / 'c.txt.gz')))
  data = gzip.compress('\n\n'.join(_text(40) for _ in range(500)).encode())
  (tmp / 'c.txt.gz').write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize('case', CLI_CASES)
def test_cli_bad_input_is_one_line(tmp_path, case):
  args, message, static = CLI_CASES[case]
  _write_experiments(tmp_path)
  workdir = tmp_path / 'run'
  kept = workdir / 'checkpoints' / '4'
  kept.mkdir(parents=True)
  (kept / 'marker').write_text('a step of an earlier run')
  args = [a.format(tmp=tmp_path) for a in args]
  if '--config' not in args:
    args = ['--config', 'experiments/tiny_sft.py' if case == 'posttrain' else TINY, *args]
  module = 'train.posttrain' if case == 'posttrain' else 'train'
  out = run_cli(['python', '-m', module, *args], workdir)
  errors = [line for line in out.stderr.splitlines() if line.startswith('error: ')]
  assert out.returncode != 0 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert len(errors) == 1 and message.format(tmp=tmp_path) in errors[0], out.stderr[-3000:]
  assert 'parameters:' not in out.stderr and not re.search(r'compil', out.stderr, re.I)
  assert (workdir / 'config.json').exists() != static
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['4'] and (kept / 'marker').exists()


# Bad data.

def _data_cfg(tmp_path, entry, **kw):
  cfg = data_config.default_config()
  cfg.update(seq_len=64, tokenizer_docs=400, tfds_data_dir=str(tmp_path / 'tfds'), **kw)
  cfg.sources['mine'] = entry
  cfg.source = 'mine'
  return cfg


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  docs = corpus.documents(seed=0, num_docs=300) + [_text(200)]
  return tokenizer_lib.train(docs, 512, 'unigram', tmp_path_factory.mktemp('tok') / 'tok').path


def _make(cfg, tmp_path, split='train', **kw):
  return pipeline.make_iterator(cfg, vocab_size=512, global_batch=2, workdir=str(tmp_path),
                                split=split, **kw)


def test_truncated_and_corrupt_gz_are_named(tmp_path):
  good = [_text(30) for _ in range(400)]
  data = gzip.compress('\n\n'.join(good).encode())
  (tmp_path / 'cut.txt.gz').write_bytes(data[:len(data) // 2])
  (tmp_path / 'junk.txt.gz').write_bytes(b'not gzip at all\n' * 10)
  for name in ('cut.txt.gz', 'junk.txt.gz'):
    with pytest.raises(readers.BadInputError, match=rf'{tmp_path}/{name}:\d+: cannot be read from '
                                                    r'here on \((EOFError|BadGzipFile)'):
      list(readers.iter_text(str(tmp_path / name), 'paragraph', readers.BadInput('raise')))
  bad = readers.BadInput('skip')
  docs = [d for _, d in readers.iter_text(str(tmp_path / 'cut.txt.gz'), 'paragraph', bad)]
  assert bad.counts == {'unreadable': 1} and 0 < len(docs) < len(good)
  assert docs == good[:len(docs)]  # What was read before the damage, the damaged one dropped.


def test_sft_skip_mode_reports_what_it_skipped(tmp_path, tok):
  path = tmp_path / 'sft.jsonl'
  path.write_text('not json\n' * 5 + '{"prompt": 3, "response": "x"}\n' + '[1]\n')
  cfg = _data_cfg(tmp_path, data_config.source_entry('jsonl', 'sft', path=str(path)),
                  on_bad_input='skip', packing='pad', tokenizer=tok)
  with pytest.raises(data_config.DataConfigError) as e:
    _make(cfg, tmp_path)
  assert "sources.mine: split 'train' is empty" in str(e.value)
  assert "'invalid_json': 6" in str(e.value) and "'missing_field': 1" in str(e.value)
  long = {'prompt': _text(100), 'response': _text(100)}
  path.write_text('\n'.join(json.dumps(long) for _ in range(30)) + '\nbroken\n')
  with pytest.raises(data_config.DataConfigError) as e:
    _make(cfg, tmp_path)
  assert 'no example fits seq_len 64' in str(e.value) and "'too_long': 29" in str(e.value)
  assert "'invalid_json': 1" in str(e.value)  # 30 records: 29 train, 1 eval; 1 line broken.


@pytest.mark.parametrize('policy, docs, counts', [
    ('split', ['abcd', 'efgh', 'ij\nk', 'l'], {'long_doc_split': 1}),
    ('truncate', ['abcd', 'l'], {'long_doc_truncate': 1}),
    ('skip', ['l'], {'long_doc_skip': 1}),
])
def test_long_documents_follow_the_policy(tmp_path, policy, docs, counts):
  (tmp_path / 'a.txt').write_text('abcdefghij\nk\n\nl\n')
  bad = readers.BadInput('raise', max_chars=4, long_docs=policy)
  found = list(readers.iter_text(str(tmp_path / 'a.txt'), 'paragraph', bad))
  assert [d for _, d in found] == docs and bad.counts == counts
  assert len({w for w, _ in found}) == len(found)  # Pieces have their own names.
  (tmp_path / 'a.jsonl').write_text(json.dumps({'text': 'x' * 33}) + '\n{"text": "ok"}\n')
  bad = readers.BadInput('skip', max_chars=4, long_docs=policy)
  assert [d for _, d in readers.iter_jsonl_text(str(tmp_path / 'a.jsonl'), 'text', bad)] == ['ok']
  assert bad.counts == {'too_long': 1}  # A JSON line over 8 x max_chars is not parsed at all.


def test_huge_single_line_document_in_bounded_time_and_memory(tmp_path, tok):
  """The issue's 21 MB one-line document: split into max_doc_chars pieces, read in pieces."""
  path = tmp_path / 'big.txt'
  path.write_text(_text(4_300_000) + '\n')  # 21 MB, no newline inside.
  tracemalloc.start()
  bad = readers.BadInput('raise', max_chars=1_000_000)
  sizes = [len(d) for _, d in readers.iter_text(str(path), 'paragraph', bad)]
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert path.stat().st_size > 21e6 and sum(sizes) == path.stat().st_size - 1
  assert len(sizes) == 22 and max(sizes) == 1_000_000
  assert peak < 20e6, peak  # Reading the line whole would hold >= 42 MB (bytes + str).
  start = time.monotonic()
  cfg = _data_cfg(tmp_path, data_config.source_entry('local', path=str(path)), tokenizer=tok)
  train_batch, eval_batch = next(_make(cfg, tmp_path)), next(_make(cfg, tmp_path, 'eval'))
  assert time.monotonic() - start < 60
  stats = _make(cfg, tmp_path).build_stats['mine']
  assert stats['bad_input'] == {'long_doc_split': 1} and stats['hygiene'] == {'kept': 22}
  assert train_batch['inputs'].shape == eval_batch['inputs'].shape == (2, 64)


def test_corpus_preparation_leaves_nothing_in_tmpdir(tmp_path, monkeypatch):
  tmp = tmp_path / 'tmpdir'
  tmp.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp))
  (tmp_path / 'a.txt').write_text('\n\n'.join(_text(20) for _ in range(50)))
  data = gzip.compress(b'some text\n' * 1000)
  (tmp_path / 'b.txt.gz').write_bytes(data[:len(data) // 2])
  cfg = _data_cfg(tmp_path, data_config.source_entry('local', path=str(tmp_path / 'a.txt')))
  builders.prepare_local(builders.local_spec(cfg.sources.mine, cfg), cfg.tfds_data_dir)
  cfg.sources.mine.path = str(tmp_path / 'b.txt.gz')
  with pytest.raises(readers.BadInputError, match='b.txt.gz'):
    builders.prepare_local(builders.local_spec(cfg.sources.mine, cfg), cfg.tfds_data_dir)
  assert os.listdir(tmp) == []


@pytest.mark.skipif(os.geteuid() != 0, reason='as another user than root the programs run as the '
                    'caller, who can reach its own TMPDIR')
def test_sandbox_names_an_unreachable_tmpdir(tmp_path, monkeypatch):
  private = tmp_path / 'private'
  (private / 'tmp').mkdir(parents=True)
  private.chmod(0o700)
  monkeypatch.setattr(tempfile, 'tempdir', str(private / 'tmp'))
  monkeypatch.setattr(sandbox, '_probed', {})
  monkeypatch.delenv(sandbox.ENV_TIER, raising=False)
  with pytest.raises(sandbox.SandboxError) as e:
    sandbox.isolation_name()
  assert f'rlimits: TMPDIR {private}/tmp cannot be reached by the unprivileged uid' in str(e.value)
