"""HumanEval: reference solutions pass the sandboxed tests, wrong ones fail; pass@k; truncation."""

import math

import pytest

from train.eval import humaneval
from train.eval import lm
from train.eval import sandbox


@pytest.fixture
def problems(shared_data):
  return humaneval.load_problems(shared_data)


def test_load(problems):
  assert len(problems) == 164
  assert problems[0].task_id == 'HumanEval/0'
  assert problems[0].entry_point == 'has_close_elements'
  assert len({p.task_id for p in problems}) == 164


def test_all_canonical_pass_and_wrong_fail(problems):
  """All 164 reference solutions pass; `return None` bodies fail, in one parallel batch."""
  completions = [[p.canonical_solution, '    return None\n'] for p in problems]
  result = humaneval.score(problems, completions, ks=(1, 2))
  bad = {tid: r['statuses'] for tid, r in result['per_problem'].items()
         if r['statuses'] != ['passed', 'failed']}
  assert not bad
  assert result['metrics'] == {'pass@1': 0.5, 'pass@2': 1.0}
  print(f"164x2 programs in {result['sandbox_seconds']:.1f} s under {result['isolation']}")


def test_hostile_completions_score_as_failing(problems, tmp_path):
  canary = tmp_path / 'canary.txt'
  canary.write_text('alive')
  hostile = [
      '    import time\n    time.sleep(10**6)\n',
      '    return input()\n',
      f'    import os\n    os.remove({str(canary)!r})\n    return True\n',
      '    import os\n    while True:\n        os.fork()\n',
      '    x = []\n    while True:\n        x.append(bytearray(1 << 24))\n',
      '    import sys\n    sys.exit(0)\n',
  ]
  result = humaneval.score(problems[:1], [hostile], ks=(1,),
                           limits=sandbox.Limits(timeout_s=1.0))
  assert result['metrics'] == {'pass@1': 0.0}
  assert 'passed' not in result['per_problem']['HumanEval/0']['statuses']
  assert canary.read_text() == 'alive'


def test_program_layout(problems):
  p = problems[0]
  text = humaneval.program(p, '    return 1\n')
  assert text == p.prompt + '    return 1\n' + '\n' + p.test + '\n' + 'check(has_close_elements)'


def test_truncate():
  assert humaneval.truncate('    return 1\n\ndef other():\n  pass') == '    return 1\n'
  assert humaneval.truncate('    x = 1\n    # fine\n    return x\nprint(x)') == (
      '    x = 1\n    # fine\n    return x')
  assert humaneval.truncate('  a\nif b\nclass c') == '  a'  # The earliest stop wins.
  assert humaneval.truncate('    return 2\n') == '    return 2\n'
  assert humaneval.truncate('\n#x') == ''


@pytest.mark.parametrize('n,c,k', [(n, c, k) for n in (1, 2, 5, 10, 20) for c in range(n + 1)
                                   for k in (1, 2, 5, 10) if k <= n])
def test_pass_at_k_matches_binomial_form(n, c, k):
  exact = 1.0 - math.comb(n - c, k) / math.comb(n, k)
  assert humaneval.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_edges():
  assert humaneval.pass_at_k(10, 0, 1) == 0.0
  assert humaneval.pass_at_k(10, 10, 10) == 1.0
  assert humaneval.pass_at_k(10, 1, 10) == 1.0  # n - c < k: some draw of k always holds it.
  assert humaneval.pass_at_k(10, 3, 1) == pytest.approx(0.3)
  # Large n: the product form needs no big integers and stays accurate.
  assert humaneval.pass_at_k(2000, 3, 100) == pytest.approx(
      1 - math.comb(1997, 100) / math.comb(2000, 100), rel=1e-12)
  for n, c, k in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
    with pytest.raises(ValueError, match='pass@k'):
      humaneval.pass_at_k(n, c, k)


class _ScriptedModel:
  """Samples per prompt: [reference + junk after a stop sequence, wrong, reference]."""

  def __init__(self, problems):
    self.solutions = {p.prompt: p.canonical_solution for p in problems}
    self.calls = []

  def loglikelihood(self, requests):
    raise AssertionError('HumanEval does not score likelihoods')

  def generate(self, prompts, *, max_new_tokens, stop, temperature=0.0, num_samples=1):
    self.calls.append(dict(max_new_tokens=max_new_tokens, stop=stop, temperature=temperature,
                           num_samples=num_samples))
    out = []
    for p in prompts:
      good = self.solutions[p]
      out.append([good + '\ndef junk(:\n', '    return None\n', good][:num_samples])
    return out


def test_evaluate_end_to_end(problems, shared_data):
  model = _ScriptedModel(problems)
  assert isinstance(model, lm.LanguageModel)
  result = humaneval.evaluate(model, shared_data, num_samples=3, temperature=0.8, limit=6,
                              ks=(1, 2, 10))
  assert model.calls == [dict(max_new_tokens=512, stop=list(humaneval.STOP_SEQUENCES),
                              temperature=0.8, num_samples=3)]
  # c = 2 of n = 3 on every problem; k = 10 > n is left out.
  assert result['metrics'] == {'pass@1': pytest.approx(2 / 3), 'pass@2': 1.0}
  assert result['num_problems'] == 6
  for r in result['per_problem'].values():
    assert r['statuses'] == ['passed', 'failed', 'passed']
  assert result['isolation'] == sandbox.isolation_name()


def test_evaluate_rejects_greedy_multi_sample(problems, shared_data):
  with pytest.raises(ValueError, match='temperature'):
    humaneval.evaluate(_ScriptedModel(problems), shared_data, num_samples=2, temperature=0.0)


def test_score_checks_shapes(problems):
  with pytest.raises(ValueError, match='completion lists'):
    humaneval.score(problems[:2], [['x']])
  with pytest.raises(ValueError, match='same, non-zero'):
    humaneval.score(problems[:2], [['x'], ['x', 'y']])
