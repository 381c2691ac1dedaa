"""GSM8K: few-shot chain-of-thought generation, exact match on the final number.

Prompt: k solved train problems `Question: {q}\\nAnswer: {a}\\n\\n` (drawn with a fixed seed,
calculator notes `<<48/2=24>>` removed unless asked to keep them), then `Question: {q}\\nAnswer:`.
Gold answer: the number after `#### `. A prediction is read the same way ("strict") or as the last
number ("flexible"); both are normalised (`normalise`) and compared as strings; no number: wrong.
"""

import decimal
import pathlib
import random
import re

from train.eval import data_dir as data_dir_lib
from train.eval import lm as lm_lib

TRAIN_FILE = 'gsm8k_train.jsonl'
TEST_FILE = 'gsm8k_test.jsonl'
STOP_SEQUENCES = ('Question:', '\n\n\n')
_STRICT = re.compile(r'#### (\-?[0-9\.\,]+)')
_NUMBER = re.compile(r'-?\$?\d[\d,]*(?:\.\d+)?')
_CALCULATOR = re.compile(r'<<[^>]*>>')


def load(path: str | pathlib.Path) -> list[dict]:
  """Rows `{"question", "answer"}`; errors name the file and line."""
  return data_dir_lib.read_jsonl(pathlib.Path(path), 'GSM8K', ('question', 'answer'))


def normalise(number: str) -> str | None:
  """Canonical text of a number (`1,234.50` -> `1234.5`, `$7.` -> `7`); None if it is none."""
  text = number.strip().replace(',', '').replace('$', '').rstrip('.')
  try:
    value = decimal.Decimal(text)
  except decimal.InvalidOperation:
    return None
  if not value.is_finite():
    return None
  return str(int(value)) if value == value.to_integral_value() else format(value.normalize(), 'f')


def extract_strict(text: str) -> str | None:
  """The number after the first `#### `, normalised."""
  match = _STRICT.search(text)
  return normalise(match.group(1)) if match else None


def extract_flexible(text: str) -> str | None:
  """The last number in the text, normalised."""
  numbers = map(normalise, reversed(_NUMBER.findall(text)))
  return next((value for value in numbers if value is not None), None)


def format_example(question: str, answer: str | None = None, keep_calculator: bool = False) -> str:
  if answer is None:
    return f'Question: {question}\nAnswer:'
  answer = answer if keep_calculator else _CALCULATOR.sub('', answer)
  return f'Question: {question}\nAnswer: {answer}\n\n'


def build_prompt(shots: list[dict], question: str, keep_calculator: bool = False) -> str:
  return ''.join(format_example(s['question'], s['answer'], keep_calculator) for s in shots) + (
      format_example(question))


def truncate(completion: str) -> str:
  """Cuts the completion at the earliest of STOP_SEQUENCES (the sequence itself is dropped)."""
  return lm_lib.truncate(completion, STOP_SEQUENCES)


def evaluate(model: lm_lib.LanguageModel, data_dir: str | pathlib.Path | None = None, *,
             k: int = 5, seed: int = 1234, max_new_tokens: int = 256,
             keep_calculator: bool = False, limit: int | None = None) -> dict:
  """Greedy k-shot exact match (strict and flexible extraction) on the test split."""
  root = data_dir_lib.resolve(data_dir)
  train = load(root / TRAIN_FILE)
  test = load(root / TEST_FILE)[:limit]
  if not 0 <= k <= len(train):
    raise ValueError(f'GSM8K k={k} outside [0, {len(train)}]')
  shots = [train[i] for i in random.Random(seed).sample(range(len(train)), k)]
  prompts = [build_prompt(shots, row['question'], keep_calculator) for row in test]
  samples = model.generate(prompts, max_new_tokens=max_new_tokens, stop=list(STOP_SEQUENCES),
                           temperature=0.0, num_samples=1)
  if len(samples) != len(test):
    raise ValueError(f'model.generate returned {len(samples)} lists for {len(test)} prompts')
  items = []
  for row, sample in zip(test, samples):
    completion = truncate(sample[0])
    gold = extract_strict(row['answer'])
    if gold is None:
      raise ValueError(f'GSM8K gold answer without "#### <number>": {row["answer"][-80:]!r}')
    items.append({'gold': gold, 'strict': extract_strict(completion),
                  'flexible': extract_flexible(completion), 'completion': completion})
  match = lambda key: sum(i[key] == i['gold'] for i in items) / len(items)
  return {'task': 'gsm8k', 'count': len(items), 'items': items,
          'metrics': {'exact_match_strict': match('strict'),
                      'exact_match_flexible': match('flexible')},
          'config': {'k': k, 'seed': seed, 'max_new_tokens': max_new_tokens,
                     'keep_calculator': keep_calculator, 'limit': limit}}
