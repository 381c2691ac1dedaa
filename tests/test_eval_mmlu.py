"""MMLU: prompts byte-identical to the reference layout, k shrinking, scoring with fake models."""

import csv

import pytest

from train.eval import mmlu

# Written by hand from the csv rows (mmlu/dev/abstract_algebra_dev.csv rows 1-2,
# mmlu/test/abstract_algebra_test.csv row 1).
ABSTRACT_ALGEBRA_2_SHOT = (
    'The following are multiple choice questions (with answers) about abstract algebra.\n\n'
    'Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\n'
    'A. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n'
    'Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. Statement 2 | '
    'If H and K are subgroups of G then HK is a subgroup of G.\n'
    'A. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: B\n\n'
    'Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n'
    'A. 0\nB. 4\nC. 2\nD. 6\nAnswer:')

# mmlu/dev/high_school_statistics_dev.csv (all 5 rows, the last with newlines inside the
# question) and mmlu/test/high_school_statistics_test.csv row 1.
HIGH_SCHOOL_STATISTICS_5_SHOT = (
    'The following are multiple choice questions (with answers) about high school statistics.\n\n'
    'Which of the following is a correct statement about correlation?\n'
    'A. If the slope of the regression line is exactly 1, then the correlation is exactly 1.\n'
    'B. If the correlation is 0, then the slope of the regression line is undefined.\n'
    'C. Switching which variable is called x and which is called y changes the sign of the '
    'correlation.\n'
    'D. The correlation r is equal to the slope of the regression line when z-scores for the '
    'y-variable are plotted against z-scores for the x-variable.\n'
    'Answer: D\n\n'
    'Suppose X and Y are random variables with E(X) = 37, var(X) = 5, E(Y) = 62, and var(Y) = 12. '
    'What are the expected value and variance of the random variable X + Y?\n'
    'A. E(X + Y) = 99, var(X + Y) = 8.5\n'
    'B. E(X + Y) = 99, var(X + Y) = 13\n'
    'C. E(X + Y) = 99, var(X + Y) = 17\n'
    'D. There is insufficient information to answer this question.\n'
    'Answer: D\n\n'
    'After a frost warning was issued, the owner of a large orange grove asked his workers to spray '
    'all his trees with water. The water was supposed to freeze and form a protective covering of '
    'ice around the orange blossom. Nevertheless, the owner suspected that some trees suffered '
    'considerable damage due to the frost. To estimate the proportion of trees that suffered more '
    'than 50 percent damage due to the frost, he took a random sample of 100 trees from his grove. '
    'What is the response variable in this experiment?\n'
    'A. The proportion of trees that suffered more than 50 percent damage due to frost.\n'
    'B. The number of trees affected by the frost.\n'
    'C. The number of trees sampled from the grove.\n'
    'D. For each sampled tree, whether it suffered more than 50 percent damage or at most 50 '
    'percent damage.\n'
    'Answer: D\n\n'
    'A new smartwatch is manufactured in one part of a factory, then secured for shipping in '
    'another, independent part of the factory. The weight of the smartwatch has a mean of 62 grams '
    'and a standard deviation of 1.0 grams. The weight of the packaging (box, user\'s guide, bubble '
    'wrap, etc.) has a mean of 456 grams and a standard deviation of 6 grams. Together, the '
    'distribution of the weight of the smartwatch and its packaging would have the following mean '
    'and standard deviation:\n'
    'A. Mean 518 grams; standard deviation 7.0 grams\n'
    'B. Mean 518 grams; standard deviation 3.5 grams\n'
    'C. Mean 518 grams; standard deviation 6.1 grams\n'
    'D. Mean 394 grams; standard deviation 6.1 grams\n'
    'Answer: C\n\n'
    'Which of the following sets has the smallest standard deviation? Which has the largest?\n'
    'I: {1,2,3}\nII: {-10,10}\nIII: {100}\n\n'
    'A. I, II\nB. II, III\nC. III, I\nD. III, II\n'
    'Answer: D\n\n'
    'The weight of an aspirin tablet is 300 milligrams according to the bottle label. An FDA '
    'investigator weighs a simple random sample of seven tablets, obtains weights of 299, 300, 305, '
    '302, 299, 301, and 303, and runs a hypothesis test of the manufacturer\'s claim. Which of the '
    'following gives the P-value of this test?\n'
    'A. P(t > 1.54) with df = 6\nB. 2P(t > 1.54) with df = 6\n'
    'C. P(t > 1.54) with df = 7\nD. 2P(t > 1.54) with df = 7\n'
    'Answer:')

# mmlu/dev/college_mathematics_dev.csv row 3: CRLF line breaks inside the quoted question stay.
COLLEGE_MATHEMATICS_DEV_3 = (
    'Let A be a real 2x2 matrix. Which of the following statements must be true?\r\n'
    'I. All of the entries of A^2 are nonnegative.\r\n'
    'II. The determinant of A^2 is nonnegative.\r\n'
    'III. If A has two distinct eigenvalues, then A^2 has two distinct eigenvalues.\n'
    'A. I only\nB. II only\nC. III only\nD. II and III only\nAnswer: B\n\n')


def _load(shared_data, subject, split):
  return mmlu.load_csv(shared_data / 'mmlu' / split / f'{subject}_{split}.csv')


def test_prompts_match_reference(shared_data):
  dev = _load(shared_data, 'abstract_algebra', 'dev')
  test = _load(shared_data, 'abstract_algebra', 'test')
  assert mmlu.build_prompt('abstract_algebra', dev, test[0], k=2) == (ABSTRACT_ALGEBRA_2_SHOT, 2)
  dev = _load(shared_data, 'high_school_statistics', 'dev')
  test = _load(shared_data, 'high_school_statistics', 'test')
  assert mmlu.build_prompt('high_school_statistics', dev, test[0]) == (
      HIGH_SCHOOL_STATISTICS_5_SHOT, 5)
  dev = _load(shared_data, 'college_mathematics', 'dev')
  assert mmlu.format_example(dev[2], include_answer=True) == COLLEGE_MATHEMATICS_DEV_3


def test_subjects(shared_data):
  names = mmlu.subjects(shared_data)
  assert len(names) == 57
  assert names[0] == 'abstract_algebra' and 'high_school_statistics' in names
  counts = [len(_load(shared_data, s, 'dev')) for s in names]
  assert counts == [5] * 57


def test_k_shrinks_to_fit(shared_data):
  dev = _load(shared_data, 'high_school_statistics', 'dev')
  item = _load(shared_data, 'high_school_statistics', 'test')[0]
  two_shot, _ = mmlu.build_prompt('high_school_statistics', dev, item, k=2)
  three_shot, _ = mmlu.build_prompt('high_school_statistics', dev, item, k=3)
  # Character count as the token count: room for the 2-shot prompt plus ' A', not the 3-shot.
  assert len(three_shot) > len(two_shot) + 2
  prompt, k = mmlu.build_prompt('high_school_statistics', dev, item, k=5, count_tokens=len,
                                max_length=len(two_shot) + 2)
  assert (prompt, k) == (two_shot, 2)
  prompt, k = mmlu.build_prompt('high_school_statistics', dev, item, k=5, count_tokens=len,
                                max_length=len(two_shot) + 1)
  assert k == 1
  prompt, k = mmlu.build_prompt('high_school_statistics', dev, item, k=5, count_tokens=len,
                                max_length=10)
  assert k == 0 and prompt.endswith('with df = 7\nAnswer:')
  with pytest.raises(ValueError, match='both count_tokens and max_length'):
    mmlu.build_prompt('high_school_statistics', dev, item, count_tokens=len)
  with pytest.raises(ValueError, match='k=6'):
    mmlu.build_prompt('high_school_statistics', dev, item, k=6)


def test_bad_csv_names_file_and_line(tmp_path):
  path = tmp_path / 'x_test.csv'
  path.write_text('q,a,b,c,d,A\nq2,a,b,c,d,E\n')
  with pytest.raises(ValueError, match=r'x_test.csv:2: answer .E.'):
    mmlu.load_csv(path)
  path.write_text('q,a,b,c,A\n')
  with pytest.raises(ValueError, match=r'x_test.csv:1: expected 6 columns'):
    mmlu.load_csv(path)


def _truth(shared_data, names):
  """subject -> [(question block as the test formats it, answer letter)], read independently."""
  truth = {}
  for s in names:
    with open(shared_data / 'mmlu' / 'test' / f'{s}_test.csv', newline='', encoding='utf-8') as f:
      rows = list(csv.reader(f))
    truth[s] = [(f'{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:', ans)
                for q, a, b, c, d, ans in rows]
  return truth


class _FakeModel:
  """Scores ' X' 0 and the rest -1, where X is the true answer (oracle) or a fixed letter.

  It checks that requests come in file order, four per question, each context ending with the
  question it expects.
  """

  def __init__(self, truth, letter=None):
    self.queue = [item for items in truth.values() for item in items]
    self.letter = letter
    self.position = 0

  def loglikelihood(self, requests):
    scores = []
    for i in range(0, len(requests), 4):
      block, answer = self.queue[self.position]
      self.position += 1
      group = requests[i:i + 4]
      assert [c for _, c in group] == [' A', ' B', ' C', ' D']
      assert all(ctx == group[0][0] and ctx.endswith(block) for ctx, _ in group)
      pick = self.letter or answer
      scores += [0.0 if c == ' ' + pick else -1.0 for _, c in group]
    return scores

  def generate(self, prompts, **kwargs):
    raise AssertionError('MMLU only scores likelihoods')


def test_oracle_scores_100_percent(shared_data):
  names = mmlu.subjects(shared_data)
  truth = _truth(shared_data, names)
  model = _FakeModel(truth)
  result = mmlu.evaluate(model, shared_data)
  assert model.position == 14042 == result['count']
  assert result['metrics'] == {'accuracy': 1.0, 'macro_accuracy': 1.0}
  assert all(s['accuracy'] == 1.0 and s['min_k'] == 5 for s in result['per_subject'].values())


@pytest.mark.parametrize('letter', ['A', 'C'])
def test_constant_model_scores_letter_frequency(shared_data, letter):
  names = ['abstract_algebra', 'high_school_statistics', 'college_mathematics']
  truth = _truth(shared_data, names)
  result = mmlu.evaluate(_FakeModel(truth, letter), shared_data, subject_names=names)
  answers = [a for items in truth.values() for _, a in items]
  assert result['metrics']['accuracy'] == answers.count(letter) / len(answers)
  for s in names:
    subject_answers = [a for _, a in truth[s]]
    assert result['per_subject'][s]['accuracy'] == (
        subject_answers.count(letter) / len(subject_answers))
    assert result['per_subject'][s]['count'] == len(subject_answers)


def test_ties_go_to_first_letter(shared_data):
  class Flat:
    def loglikelihood(self, requests):
      return [-2.0] * len(requests)

  names = ['abstract_algebra']
  answers = [a for _, a in _truth(shared_data, names)['abstract_algebra']]
  result = mmlu.evaluate(Flat(), shared_data, subject_names=names, limit_per_subject=40)
  assert result['per_subject']['abstract_algebra']['accuracy'] == answers[:40].count('A') / 40
