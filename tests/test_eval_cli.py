"""`python -m train.eval` on a checkpoint written by the train loop itself (no hand-made files)."""

import json

import pytest

from tests.util import run_config
from train import loop
from train.eval import __main__ as eval_main


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp('run')
  loop.run(run_config(steps=2, ckpt_every=2), str(path))
  return path


def test_loss_of_a_pretraining_run_with_default_json(workdir, capsys):
  assert eval_main.main(['--checkpoint', str(workdir), '--tasks', 'loss']) == 0
  printed = capsys.readouterr().out
  assert 'loss:' in printed
  document = json.loads((workdir / 'eval_2.json').read_text())
  loss = document['results'][0]
  assert document['step'] == 2 and loss['task'] == 'loss' and loss['count'] > 0
  assert 5.0 < loss['metrics']['loss'] < 7.5  # Two steps from random over a 512-token vocabulary.


def test_a_mesh_this_machine_lacks_falls_back_to_fsdp(workdir, capsys):
  config = json.loads((workdir / 'config.json').read_text())
  config['mesh'] = dict(data=1, fsdp=256, expert=1, tensor=1)  # As if trained on 256 devices.
  (workdir / 'config.json').write_text(json.dumps(config))
  out = workdir / 'fallback.json'
  assert eval_main.main(['--checkpoint', str(workdir), '--tasks', 'loss', '--out', str(out)]) == 0
  assert 'evaluating with fsdp over all 8 devices' in capsys.readouterr().err
  first = json.loads((workdir / 'eval_2.json').read_text())['results'][0]['metrics']['loss']
  assert json.loads(out.read_text())['results'][0]['metrics']['loss'] == pytest.approx(first, rel=1e-5)
  assert eval_main.main(['--checkpoint', str(workdir), '--tasks', 'loss', '--mesh', 'fsdp=3']) == 2
  assert 'mesh' in capsys.readouterr().err


def test_humaneval_samples_give_pass_at_k(workdir, shared_data, tmp_path):
  out = tmp_path / 'he.json'
  assert eval_main.main(['--checkpoint', str(workdir), '--tasks', 'humaneval', '--limit', '1',
                         '--humaneval_samples', '2', '--temperature', '0.8', '--max_new_tokens', '4',
                         '--data_dir', str(shared_data), '--out', str(out), '--mesh', 'fsdp=8']) == 0
  result = json.loads(out.read_text())['results'][0]
  assert result['num_problems'] == 1 and 'pass@1' in result['metrics'] and 'pass@10' not in result['metrics']
