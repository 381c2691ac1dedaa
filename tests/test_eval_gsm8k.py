"""GSM8K: answer extraction recovers every gold answer; prompts; scoring with fake models."""

import json

import pytest

from train.eval import gsm8k


def _rows(shared_data, split):
  with open(shared_data / f'gsm8k_{split}.jsonl', encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def test_extraction_recovers_every_gold_answer(shared_data):
  rows = _rows(shared_data, 'test')
  assert len(rows) == 1319
  for row in rows:
    # Independent reading: every gold answer here is an integer after the last '#### '.
    expected = str(int(row['answer'].rsplit('#### ', 1)[1].replace(',', '')))
    assert gsm8k.extract_strict(row['answer']) == expected, row['answer'][-60:]
    assert gsm8k.extract_flexible(row['answer']) == expected, row['answer'][-60:]


@pytest.mark.parametrize('raw,expected', [
    ('1,234', '1234'), ('$5.00', '5'), ('-3', '-3'), ('5.50', '5.5'), ('007', '7'),
    ('5.', '5'), ('0.25', '0.25'), ('-0', '0'), ('1,000,000', '1000000'),
    ('.', None), ('', None), ('-', None), ('1.2.3', None)])
def test_normalise(raw, expected):
  assert gsm8k.normalise(raw) == expected


def test_strict_and_flexible():
  assert gsm8k.extract_strict('so 3 + 4 = 7\n#### 7') == '7'
  assert gsm8k.extract_strict('#### 1,500.') == '1500'
  assert gsm8k.extract_strict('the answer is 7') is None
  assert gsm8k.extract_strict('####7') is None  # The reference needs the space.
  assert gsm8k.extract_flexible('the answer is 7') == '7'
  assert gsm8k.extract_flexible('She pays $1,250.50 in total.') == '1250.5'
  assert gsm8k.extract_flexible('3 apples and 4 pears: 7 fruits') == '7'
  assert gsm8k.extract_flexible('no digits here') is None


def test_prompt_layout(shared_data):
  train = _rows(shared_data, 'train')
  # Written by hand from gsm8k_train.jsonl row 1 (calculator notes removed).
  expected = (
      'Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many '
      'clips in May. How many clips did Natalia sell altogether in April and May?\n'
      'Answer: Natalia sold 48/2 = 24 clips in May.\n'
      'Natalia sold 48+24 = 72 clips altogether in April and May.\n#### 72\n\n'
      'Question: How many legs do 3 cats have?\nAnswer:')
  assert gsm8k.build_prompt(train[:1], 'How many legs do 3 cats have?') == expected
  kept = gsm8k.build_prompt(train[:1], 'Q?', keep_calculator=True)
  assert 'Natalia sold 48/2 = <<48/2=24>>24 clips in May.' in kept


def test_truncate():
  assert gsm8k.truncate(' 3 + 4 = 7\n#### 7\n\nQuestion: next') == ' 3 + 4 = 7\n#### 7\n\n'
  assert gsm8k.truncate(' 7\n\n\n\nnoise') == ' 7'


class _FakeModel:
  """Answers each test question in order; `answer(row)` gives the completion text."""

  def __init__(self, rows, answer):
    self.rows = rows
    self.answer = answer
    self.calls = []

  def loglikelihood(self, requests):
    raise AssertionError('GSM8K only generates')

  def generate(self, prompts, *, max_new_tokens, stop, temperature=0.0, num_samples=1):
    self.calls.append((max_new_tokens, stop, temperature, num_samples))
    assert len(prompts) == len(self.rows)
    out = []
    for prompt, row in zip(prompts, self.rows):
      assert prompt.endswith(f'Question: {row["question"]}\nAnswer:')
      assert prompt.count('Question: ') == 6  # 5 shots + the test question.
      out.append([self.answer(row)])
    return out


def test_oracle_scores_100_percent(shared_data):
  rows = _rows(shared_data, 'test')
  model = _FakeModel(rows, lambda r: ' ' + r['answer'] + '\n\nQuestion: 2 + 2?\nAnswer: #### 4')
  result = gsm8k.evaluate(model, shared_data)
  assert model.calls == [(256, list(gsm8k.STOP_SEQUENCES), 0.0, 1)]
  assert result['count'] == 1319
  assert result['metrics'] == {'exact_match_strict': 1.0, 'exact_match_flexible': 1.0}


def test_constant_and_flexible_only_models(shared_data):
  rows = _rows(shared_data, 'test')[:300]
  golds = [str(int(r['answer'].rsplit('#### ', 1)[1].replace(',', ''))) for r in rows]
  constant = gsm8k.evaluate(_FakeModel(rows, lambda r: ' So it is 3.\n#### 3'), shared_data,
                            limit=300)
  assert constant['metrics']['exact_match_strict'] == golds.count('3') / 300
  assert constant['metrics']['exact_match_flexible'] == golds.count('3') / 300
  assert golds.count('3') > 0

  def prose(row):  # Right number, written with thousands separators, without '#### '.
    return f' The total is {int(row["answer"].rsplit("#### ", 1)[1].replace(",", "")):,} dollars.'

  loose = gsm8k.evaluate(_FakeModel(rows, prose), shared_data, limit=300)
  assert loose['metrics'] == {'exact_match_strict': 0.0, 'exact_match_flexible': 1.0}


def test_bad_rows_name_file_and_line(tmp_path):
  path = tmp_path / 'g.jsonl'
  path.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n')
  with pytest.raises(ValueError, match=r'g.jsonl:2'):
    gsm8k.load(path)
