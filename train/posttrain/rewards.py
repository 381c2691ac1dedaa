"""Verifiable rewards of the RL stages: `fn(prompt, reply, reference) -> float` over texts.

`reference` is the last assistant reply of the prompt's SFT record: for the embedded task the
answer or "The answer is <answer>.", for GSM8K a solution ending "#### <number>".
  embedded: 1.0 if the reply is exactly the answer or "The answer is <answer>." (task_eval), else 0;
  gsm8k:    1.0 if the reply's final number (gsm8k.py strict/flexible) is the reference's, else 0;
  module:function  a user's function of the same signature, imported (e.g. mypkg.rm:score).
"""

import importlib

from model.config import ConfigError
from train.eval import gsm8k

NAMED = ('embedded', 'gsm8k')


def embedded_correct(reply: str, answer: str) -> bool:
  return reply.strip() in (answer, f'The answer is {answer}.')


def embedded(prompt: str, reply: str, reference: str) -> float:
  del prompt
  answer = reference.strip()  # "The answer is X." -> "X".
  if answer.startswith('The answer is ') and answer.endswith('.'):
    answer = answer[len('The answer is '):-1]
  return float(embedded_correct(reply, answer))


def gsm8k_reward(prompt: str, reply: str, reference: str) -> float:
  del prompt
  gold = gsm8k.extract_strict(reference) or gsm8k.extract_flexible(reference)
  guess = gsm8k.extract_strict(reply) or gsm8k.extract_flexible(reply)
  return float(gold is not None and guess == gold)


def make(spec: str, key: str = 'grpo.reward'):
  """The reward function `spec` names; a ConfigError naming `key` if there is none."""
  if named := {'embedded': embedded, 'gsm8k': gsm8k_reward}.get(spec):
    return named
  module, _, name = spec.partition(':')
  if not module or not name:
    raise ConfigError(f'{key}={spec!r}: use one of {NAMED} or module:function')
  try:
    fn = getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as e:
    raise ConfigError(f'{key}={spec!r}: {e}') from None
  if not callable(fn):
    raise ConfigError(f'{key}={spec!r} is not a function')
  return fn
