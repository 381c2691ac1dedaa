"""Report: JSON round trip and the printed table."""

import json

import pytest

from train.eval import report

RESULTS = [
    {'task': 'mmlu', 'metrics': {'accuracy': 0.25, 'macro_accuracy': 0.5}, 'count': 8,
     'per_subject': {'anatomy': {'accuracy': 0.5, 'correct': 2, 'count': 4},
                     'virology': {'accuracy': 0.0, 'correct': 0, 'count': 4}}},
    {'task': 'humaneval', 'metrics': {'pass@1': 0.125}, 'num_problems': 164},
]


def test_json_round_trip(tmp_path):
  path = report.write_json(RESULTS, tmp_path / 'sub' / 'eval.json', extra={'step': 7})
  document = json.loads(path.read_text())
  assert document['step'] == 7 and 'created' in document
  assert report.read_json(path) == RESULTS
  assert not list(path.parent.glob('*.tmp'))


def test_table():
  table = report.format_table(RESULTS, per_subject=True)
  assert table.splitlines() == [
      'task       | metric         | value  | n',
      '-----------+----------------+--------+----',
      'mmlu       | accuracy       | 25.00% | 8',
      'mmlu       | macro_accuracy | 50.00% | 8',
      '  anatomy  | accuracy       | 50.00% | 4',
      '  virology | accuracy       | 0.00%  | 4',
      'humaneval  | pass@1         | 12.50% | 164',
  ]
  assert 'anatomy' not in report.format_table(RESULTS)


def test_bad_results(tmp_path):
  with pytest.raises(ValueError, match='result #0'):
    report.format_table([{'metrics': {}}])
  with pytest.raises(ValueError, match='not an evaluation report'):
    (tmp_path / 'x.json').write_text('{}')
    report.read_json(tmp_path / 'x.json')
  with pytest.raises(ValueError):  # NaN is not valid JSON.
    report.write_json([{'task': 't', 'metrics': {'m': float('nan')}}], tmp_path / 'y.json')
