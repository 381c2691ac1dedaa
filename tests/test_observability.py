"""What a run shows about itself: TensorBoard scalars of every metric (read back from the event
file), text samples from the current params, a jax.profiler trace of the asked steps, the
loss/throughput PNG, and the terminal progress bar (process 0, a terminal, train.progress).

One tiny MoE run (so the moe/* metrics exist) serves all the run-level tests."""

import gzip
import io
import json
import logging
import pathlib
import struct
import sys

import jax
import numpy as np
import pytest

from model.config import ConfigError
from model.moe import AUX_KEYS
from tests.util import run_config
from train import loop, metrics, plots, profiling, samples

STEPS = 6


class Terminal(io.StringIO):
  """stderr as a terminal would be (tqdm draws its bar only there)."""

  def isatty(self):
    return True


def moe_config():
  c = run_config(steps=STEPS, log_every=1, eval_every=3, sample_every=3, profile_steps='2:4',
                 progress=True, ckpt_every=STEPS)
  c.model.update(num_experts=4, experts_per_token=2)
  return c


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('obs')
  terminal = Terminal()
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sys, 'stderr', terminal)
    result = loop.run(moe_config(), str(workdir))
  for handler in logging.getLogger('meshlm').handlers:  # If this run created the handler.
    if getattr(handler, 'stream', None) is terminal:
      handler.setStream(sys.__stderr__)
  return workdir, result, terminal.getvalue()


def read_events(tb_dir) -> list:
  """Every Event in the TFRecord files tensorboardX wrote (8-byte length, its CRC, the
  record, its CRC), parsed with tensorboardX's own protos."""
  from tensorboardX.proto import event_pb2
  events = []
  for path in sorted(pathlib.Path(tb_dir).glob('events.out.tfevents.*')):
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
      pos += 12 + length + 4
  return events


def scalars(events) -> dict[str, dict[int, float]]:
  out = {}
  for event in events:
    for value in event.summary.value:
      if value.HasField('simple_value'):
        out.setdefault(value.tag, {})[event.step] = value.simple_value
  return out


def texts(events) -> dict[str, dict[int, str]]:
  out = {}
  for event in events:
    for value in event.summary.value:
      if value.metadata.plugin_data.plugin_name == 'text':
        tag = value.tag.removesuffix('/text_summary')  # tensorboardX's suffix of text tags.
        out.setdefault(tag, {})[event.step] = value.tensor.string_val[0].decode()
  return out


def test_tensorboard_has_every_metric_of_the_run(run):
  workdir, result, _ = run
  tb = scalars(read_events(workdir / 'tb'))
  train_tags = {'loss', 'learning_rate', 'grad_norm', 'param_norm', 'perf/tokens_per_sec',
                'perf/step_time', 'perf/mfu', 'skipped_steps'} | {f'moe/{k}' for k in AUX_KEYS}
  assert train_tags <= set(tb), sorted(train_tags - set(tb))
  assert {'eval/loss', 'eval/perplexity'} <= set(tb)
  for tag in train_tags:
    assert sorted(tb[tag]) == list(range(1, STEPS + 1)), tag  # log_every=1.
  assert sorted(tb['eval/loss']) == [3, 6]  # eval_every=3.
  # The event file holds the values the run computed (history), to float32.
  history = {(h['step'], k): v for h in result.history for k, v in h.items() if k != 'step'}
  assert {(s, tag) for tag in tb for s in tb[tag]} == set(history)
  for (step, tag), value in history.items():
    np.testing.assert_allclose(tb[tag][step], value, rtol=1e-6, err_msg=f'{tag} at step {step}')
  assert tb['loss'][STEPS] < tb['loss'][1]
  assert all(v > 0 and np.isfinite(v) for tag in ('perf/tokens_per_sec', 'perf/step_time', 'perf/mfu',
                                                  'grad_norm', 'param_norm') for v in tb[tag].values())
  assert tb['skipped_steps'][STEPS] == 0


def test_text_samples_come_from_the_current_params(run):
  workdir, result, terminal = run
  text = texts(read_events(workdir / 'tb'))
  assert sorted(text) == [f'samples/{i}' for i in range(len(samples.PROMPTS))]
  assert all(sorted(steps) == [3, 6] for steps in text.values())
  # Step 6's samples are the greedy continuations of the final params, decoded independently.
  from train.config import model_config
  from train.generate import Generator
  gen = Generator(model_config(moe_config()), result.state['params'], result.tokenizer, result.mesh,
                  max_batch=len(samples.PROMPTS))
  expected = gen.generate(list(samples.PROMPTS), max_new_tokens=samples.MAX_NEW_TOKENS)
  assert any(c.token_ids for c in expected)
  for i, (prompt, completion) in enumerate(zip(samples.PROMPTS, expected)):
    assert text[f'samples/{i}'][6] == samples.markdown(prompt, completion.text)
    assert f'step 6 sample {i}: {prompt!r} -> {completion.text!r}' in terminal


def test_profile_trace_covers_the_asked_steps(run):
  workdir, _, _ = run
  [trace_dir] = (workdir / 'profile' / 'plugins' / 'profile').iterdir()
  assert list(trace_dir.glob('*.xplane.pb'))
  [perfetto] = trace_dir.glob('*.trace.json.gz')
  events = json.load(gzip.open(perfetto))['traceEvents']
  traced = {int(e['args']['step_num']) for e in events if e.get('name') == 'train' and 'args' in e}
  assert traced == {2, 3}  # profile_steps='2:4'.


def test_plot_png_is_written(run):
  workdir, _, _ = run
  path = workdir / plots.FILENAME
  from matplotlib import image
  pixels = image.imread(str(path))
  assert pixels.shape[:2] == (650, 800)
  assert path.stat().st_size > 10_000
  colours = np.unique(pixels.reshape(-1, pixels.shape[-1]).round(2), axis=0)
  assert len(colours) > 50  # Lines, text and anti-aliasing, not a blank canvas.
  # The CLI redraws it; a workdir without metrics gives no plot and a non-zero status.
  path.unlink()
  assert plots.main([str(workdir)]) == 0 and path.stat().st_size > 10_000
  assert plots.main([str(workdir / 'checkpoints')]) == 1
  assert plots.main([]) == 2


def test_progress_bar_on_the_terminal(run):
  _, _, terminal = run
  assert f'{STEPS}/{STEPS}' in terminal
  assert 'step/s' in terminal or 's/step' in terminal
  assert 'loss=' in terminal


def test_progress_bar_only_process_0_terminal_and_enabled(monkeypatch):
  def shown(enabled, stream):
    bar = metrics.Progress(enabled, total=3, stream=stream)
    for _ in range(3):
      bar.update({'loss': 1.0})
    bar.close()
    return stream.getvalue()

  assert '3/3' in shown(True, Terminal())
  assert shown(False, Terminal()) == ''  # train.progress=False.
  assert shown(True, io.StringIO()) == ''  # Not a terminal (a log file, a notebook).
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  assert shown(True, Terminal()) == ''  # Not process 0.


def test_paused_time_is_not_training_time(monkeypatch):
  clock = iter([0.0, 10.0, 14.0, 15.0, 15.0])  # reset, pause start, pause end, report, reset.
  monkeypatch.setattr(metrics.time, 'perf_counter', lambda: next(clock))
  throughput = metrics.Throughput(flops_per_token=6.0, peak=100.0)
  throughput.update(100)
  with throughput.paused():
    pass
  report = throughput.report()
  assert report['perf/step_time'] == 11.0  # 15 s less the 4 s paused.
  assert report['perf/tokens_per_sec'] == 100 / 11


def test_read_metrics_keeps_the_last_value_of_a_step(tmp_path):
  lines = [{'step': 1, 'loss': 5.0}, {'step': 2, 'loss': 4.0}, {'step': 2, 'eval/loss': 4.5},
           {'step': 2, 'loss': 3.9}, {'step': 3, 'loss': 3.0}]  # Step 2 again after a resume.
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(x) + '\n' for x in lines))
  got = plots.read_metrics(str(tmp_path / 'metrics.jsonl'))
  assert got == {'loss': ([1, 2, 3], [5.0, 3.9, 3.0]), 'eval/loss': ([2], [4.5])}
  (tmp_path / 'metrics.jsonl').write_text('{"loss": 1.0}\n')
  with pytest.raises(ValueError, match=r'metrics.jsonl:1'):
    plots.read_metrics(str(tmp_path / 'metrics.jsonl'))
  assert plots.write(str(tmp_path)) is None  # A finished run does not fail for its plot.


def test_no_matplotlib_skips_the_plot_with_a_note(tmp_path, monkeypatch, caplog):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "loss": 1.0}\n')
  monkeypatch.setitem(sys.modules, 'matplotlib.figure', None)  # Import fails.
  with caplog.at_level(logging.INFO, logger='meshlm'):
    assert plots.write(str(tmp_path)) is None
  assert 'matplotlib is not installed' in caplog.text
  assert not (tmp_path / plots.FILENAME).exists()


@pytest.mark.parametrize('spec', ['3', '4:2', '2:2', 'a:b', '-1:2'])
def test_bad_profile_steps(spec):
  with pytest.raises(ConfigError, match='train.profile_steps'):
    profiling.parse(spec)


def test_bad_observability_config_fails_before_anything(tmp_path):
  for overrides, key in [({'profile_steps': '5'}, 'train.profile_steps'),
                         ({'sample_every': -1}, 'train.sample_every')]:
    with pytest.raises(ConfigError, match=key):
      loop.run(run_config(**overrides), str(tmp_path))
    assert not list(tmp_path.iterdir())
