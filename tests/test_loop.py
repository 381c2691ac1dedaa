"""The train loop end to end: resume is bit-identical, also onto another mesh; NaN handling;
bad configs fail before compiling."""

import json
import re

import jax
import numpy as np
import pytest

from model.config import ConfigError
from tests.util import run_config
from train import loop
from train import step as step_lib


def losses(result):
  return {h['step']: h['loss'] for h in result.history if 'loss' in h}


def test_resume_is_bit_identical(tmp_path):
  straight = loop.run(run_config(), str(tmp_path / 'a'))
  first = loop.run(run_config(), str(tmp_path / 'b'), stop_after=3)
  assert int(first.state['step']) == 3
  resumed = loop.run(run_config(), str(tmp_path / 'b'))  # Picks up the step-3 checkpoint.
  assert int(resumed.state['step']) == 6
  a, b = losses(straight), losses(resumed)
  assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]
  # Data counts are logged per source and travel in the checkpoint with the iterator position.
  read = lambda r: [h['data/embedded/tokens'] for h in r.history if 'loss' in h]
  assert read(straight)[0] < read(straight)[-1] == read(resumed)[-1]
  for x, y in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_restore_onto_another_mesh(tmp_path):
  straight = loop.run(_with_mesh(fsdp=8), str(tmp_path / 'a'))
  loop.run(_with_mesh(fsdp=8), str(tmp_path / 'b'), stop_after=3)
  resumed = loop.run(_with_mesh(data=2, fsdp=2, tensor=2), str(tmp_path / 'b'))
  a, b = losses(straight), losses(resumed)
  np.testing.assert_allclose([a[s] for s in (4, 5, 6)], [b[s] for s in (4, 5, 6)], rtol=1e-4)
  q = resumed.state['params']['layers']['attn']['q_dnh']  # [L, d, n, h] = [2, 32, 4, 8]
  assert q.addressable_shards[0].data.shape == (2, 16, 2, 8)  # fsdp=2 on d, tensor=2 on n.


def _with_mesh(**sizes):
  c = run_config()
  c.mesh.update({**dict(data=1, fsdp=1, expert=1, tensor=1), **sizes})
  return c


def _diverging(**train):
  c = run_config(**train)
  c.optim.update(peak_lr=1e30, warmup_steps=1, clip_norm=0.0)
  return c


def _rows(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def test_nan_stops_with_the_step(tmp_path):
  """The step the error names is the step metrics.jsonl and the log mark non-finite."""
  with pytest.raises(loop.NonFiniteError, match=r'step \d+: non-finite') as e:
    loop.run(_diverging(), str(tmp_path / 'stop'))
  named = int(re.match(r'step (\d+):', str(e.value)).group(1))
  bad = [r['step'] for r in _rows(tmp_path / 'stop') if r.get('nonfinite') == 1]
  assert bad == [named]


def test_nan_skip_counts_and_keeps_weights_finite(tmp_path):
  result = loop.run(_diverging(nan_policy='skip'), str(tmp_path / 'skip'))
  assert result.history[-2]['skipped_steps'] >= 1
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result.state['params']))
  # A dropped update's param_norm is the norm of the params kept: those of the step before.
  rows = [r for r in _rows(tmp_path / 'skip') if 'loss' in r]
  dropped = [i for i, r in enumerate(rows) if r['nonfinite'] == 1]
  assert dropped and dropped[0] > 0 and dropped[-1] == len(rows) - 1
  for i in dropped:
    assert np.isfinite(rows[i]['param_norm']) and rows[i]['param_norm'] == rows[i - 1]['param_norm']
  np.testing.assert_allclose(rows[-1]['param_norm'], float(step_lib.scaled_norm(result.state['params'])),
                             rtol=1e-6)


@pytest.mark.parametrize('edit, message', [
    (lambda c: c.model.update(num_heads=4, num_kv_heads=3), 'model.num_kv_heads'),
    (lambda c: c.model.update(d_model=30, num_heads=4), 'model.num_heads'),
    (lambda c: c.mesh.update(fsdp=3), 'mesh'),
    (lambda c: c.train.update(global_batch=12), 'not divisible by the 8 batch shards'),
    (lambda c: c.train.update(global_batch=8, grad_accum=3), 'train.grad_accum'),
    (lambda c: c.mesh.update(fsdp=4, tensor=2) or c.model.update(num_heads=3, num_kv_heads=3, d_model=48), 'mesh.tensor'),
    (lambda c: c.train.update(nan_plicy='stop'), "'train.nan_plicy'"),
    (lambda c: c.model.update(attention='flash'), 'model.attention'),
    (lambda c: c.optim.update(warmup_steps=100), 'optim.warmup_steps'),
    (lambda c: c.train.update(log_every=0), 'train.log_every'),
    (lambda c: c.model.update(compute_dtype='int32'), 'model.compute_dtype'),
    (lambda c: c.sharding_rules.update(heads_typo='tensor'), 'sharding_rules.heads_typo'),
    (lambda c: c.data.update(packing='zigzag'), 'config.data.packing'),
])
def test_bad_configs_fail_before_compiling(tmp_path, edit, message):
  c = run_config()
  edit(c)
  with pytest.raises(ConfigError, match=message):
    loop.run(c, str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()  # Failed before anything was set up.


def test_resume_with_a_changed_model_names_the_param(tmp_path):
  loop.run(run_config(steps=2, ckpt_every=2), str(tmp_path))
  c = run_config(steps=4)
  c.model.mlp_dim = 2 * c.model.mlp_dim
  with pytest.raises(ConfigError, match=r"mlp.*has shape .* but this run's model expects"):
    loop.run(c, str(tmp_path))
