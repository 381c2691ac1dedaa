"""MMLU: k-shot multiple choice, scored by the log-likelihood of ' A', ' B', ' C', ' D'.

Prompt layout (the reference one): a header, k dev examples with answers, the test question:

  The following are multiple choice questions (with answers) about {subject}.\\n\\n
  {question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: {X}\\n\\n     (k times)
  {question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer:

Cells are read verbatim (csv, not pandas: `2` or `None` stay text). The prediction is the argmax of
the four log-likelihoods (ties: earlier letter); like the reference, k shrinks to fit `max_length`.
"""

import csv
import dataclasses
import pathlib
from typing import Callable

import numpy as np

from train.eval import data_dir as data_dir_lib
from train.eval import lm as lm_lib

CHOICES = ('A', 'B', 'C', 'D')
CONTINUATIONS = tuple(' ' + c for c in CHOICES)


@dataclasses.dataclass(frozen=True)
class Item:
  question: str
  choices: tuple[str, str, str, str]
  answer: str  # One of CHOICES.


def load_csv(path: str | pathlib.Path) -> list[Item]:
  """Rows `question,A,B,C,D,answer_letter`, no header; errors name the file and line."""
  items = []
  with open(path, newline='', encoding='utf-8') as f:
    reader = csv.reader(f)
    for row in reader:
      if len(row) != 6:
        raise ValueError(f'{path}:{reader.line_num}: expected 6 columns '
                         f'(question,A,B,C,D,answer), got {len(row)}')
      if row[5] not in CHOICES:
        raise ValueError(f'{path}:{reader.line_num}: answer {row[5]!r} is not one of {CHOICES}')
      items.append(Item(row[0], tuple(row[1:5]), row[5]))
  if not items:
    raise ValueError(f'{path}: no MMLU rows')
  return items


def subjects(data_dir: str | pathlib.Path | None = None) -> list[str]:
  """Subjects that have both mmlu/dev/{s}_dev.csv and mmlu/test/{s}_test.csv, sorted."""
  root = data_dir_lib.resolve(data_dir) / 'mmlu'
  names = sorted(p.name[:-len('_test.csv')] for p in (root / 'test').glob('*_test.csv'))
  if not names:
    raise FileNotFoundError(f'no MMLU test files {root}/test/*_test.csv')
  if missing := [s for s in names if not (root / 'dev' / f'{s}_dev.csv').is_file()]:
    raise FileNotFoundError(f'MMLU dev files missing under {root}/dev for {missing}')
  return names


def format_example(item: Item, include_answer: bool) -> str:
  text = item.question + ''.join(f'\n{l}. {c}' for l, c in zip(CHOICES, item.choices))
  return text + '\nAnswer:' + (f' {item.answer}\n\n' if include_answer else '')


def build_prompt(subject: str, dev: list[Item], item: Item, k: int = 5,
                 count_tokens: Callable[[str], int] | None = None,
                 max_length: int | None = None) -> tuple[str, int]:
  """The k-shot prompt for `item` and the k used (smaller than asked when it would not fit)."""
  if (count_tokens is None) != (max_length is None):
    raise ValueError('MMLU prompt length control needs both count_tokens and max_length')
  if not 0 <= k <= len(dev):
    raise ValueError(f'MMLU {subject}: k={k} outside [0, {len(dev)} dev examples]')
  head = ('The following are multiple choice questions (with answers) about '
          f'{subject.replace("_", " ")}.\n\n')
  question = format_example(item, include_answer=False)
  while True:
    prompt = head + ''.join(format_example(d, True) for d in dev[:k]) + question
    if (count_tokens is None or k == 0
        or max(count_tokens(prompt + c) for c in CONTINUATIONS) <= max_length):
      return prompt, k
    k -= 1


def evaluate(model: lm_lib.LanguageModel, data_dir: str | pathlib.Path | None = None, *,
             k: int = 5, count_tokens: Callable[[str], int] | None = None,
             max_length: int | None = None, subject_names: list[str] | None = None,
             limit_per_subject: int | None = None) -> dict:
  """Per-subject and micro/macro-averaged accuracy of `model`."""
  root = data_dir_lib.resolve(data_dir) / 'mmlu'
  names = subject_names or subjects(data_dir)
  per_subject = {}
  for subject in names:
    dev = load_csv(root / 'dev' / f'{subject}_dev.csv')
    test = load_csv(root / 'test' / f'{subject}_test.csv')[:limit_per_subject]
    prompts = [build_prompt(subject, dev, item, k, count_tokens, max_length) for item in test]
    requests = [(p, c) for p, _ in prompts for c in CONTINUATIONS]
    scores = model.loglikelihood(requests)
    if len(scores) != len(requests):
      raise ValueError(f'model.loglikelihood returned {len(scores)} scores for {len(requests)}')
    scores_n4 = np.asarray(scores, dtype=np.float64).reshape(len(test), len(CHOICES))
    predicted = [CHOICES[i] for i in np.argmax(scores_n4, axis=1)]
    correct = sum(p == item.answer for p, item in zip(predicted, test))
    per_subject[subject] = {'accuracy': correct / len(test), 'correct': correct,
                            'count': len(test), 'min_k': min(kk for _, kk in prompts)}
  count_total = sum(s['count'] for s in per_subject.values())
  micro = sum(s['correct'] for s in per_subject.values()) / count_total
  macro = float(np.mean([s['accuracy'] for s in per_subject.values()]))
  return {'task': 'mmlu', 'metrics': {'accuracy': micro, 'macro_accuracy': macro},
          'count': count_total, 'per_subject': per_subject,
          'config': {'k': k, 'max_length': max_length, 'limit_per_subject': limit_per_subject}}
