"""HumanEval: sample completions, run each against the problem's tests in the sandbox, pass@k.

The program of a sample is the reference layout (`program`). Generation stops at the reference stop
sequences; completions are cut at the first again, whatever the model did.
"""

import dataclasses
import pathlib
import time

import numpy as np

from train.eval import data_dir as data_dir_lib
from train.eval import lm as lm_lib
from train.eval import sandbox

STOP_SEQUENCES = ('\nclass', '\ndef', '\n#', '\nif', '\nprint')
KS = (1, 10, 100)
FILE = 'HumanEval.jsonl.gz'
_KEYS = ('task_id', 'prompt', 'canonical_solution', 'test', 'entry_point')


@dataclasses.dataclass(frozen=True)
class Problem:
  task_id: str
  prompt: str
  canonical_solution: str
  test: str
  entry_point: str


def load_problems(data_dir: str | pathlib.Path | None = None) -> list[Problem]:
  rows = data_dir_lib.read_jsonl(data_dir_lib.resolve(data_dir) / FILE, 'HumanEval', _KEYS)
  return [Problem(**{k: row[k] for k in _KEYS}) for row in rows]


def truncate(completion: str) -> str:
  """Cuts the completion at the earliest of STOP_SEQUENCES (the sequence itself is dropped)."""
  return lm_lib.truncate(completion, STOP_SEQUENCES)


def program(problem: Problem, completion: str) -> str:
  return f'{problem.prompt}{completion}\n{problem.test}\ncheck({problem.entry_point})'


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k of a problem, 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i)."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f'pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}')
  if n - c < k:
    return 1.0
  return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def score(problems: list[Problem], completions: list[list[str]], *, ks: tuple[int, ...] = KS,
          limits: sandbox.Limits = sandbox.Limits(), workers: int | None = None,
          isolation: str | None = None) -> dict:
  """Runs every completion as given and returns pass@k (k <= samples) and per-problem results."""
  if len(completions) != len(problems):
    raise ValueError(f'{len(completions)} completion lists for {len(problems)} problems')
  counts = {len(c) for c in completions}
  if len(counts) != 1 or 0 in counts:
    raise ValueError(f'every problem needs the same, non-zero number of samples; got {counts}')
  n = counts.pop()
  tier = isolation or sandbox.isolation_name()
  sources = [program(p, c) for p, cs in zip(problems, completions) for c in cs]
  t0 = time.monotonic()
  outcomes = sandbox.run_programs(sources, limits=limits, isolation=tier, workers=workers)
  seconds = time.monotonic() - t0
  per_problem = {}
  for i, p in enumerate(problems):
    mine = outcomes[i * n:(i + 1) * n]
    per_problem[p.task_id] = {'passed': sum(o.passed for o in mine),
                              'statuses': [o.status for o in mine],
                              'first_completion': completions[i][0],
                              'first_detail': mine[0].detail[-500:]}
  metrics = {f'pass@{k}': float(np.mean([pass_at_k(n, r['passed'], k)
                                         for r in per_problem.values()])) for k in ks if k <= n}
  return {'task': 'humaneval', 'metrics': metrics, 'num_problems': len(problems), 'num_samples': n,
          'isolation': tier, 'isolation_description': sandbox.isolation_description(tier),
          'sandbox_seconds': seconds, 'per_problem': per_problem}


def evaluate(model: lm_lib.LanguageModel, data_dir: str | pathlib.Path | None = None, *,
             num_samples: int = 1, temperature: float = 0.0, max_new_tokens: int = 512,
             ks: tuple[int, ...] = KS, limit: int | None = None,
             limits: sandbox.Limits = sandbox.Limits(), workers: int | None = None) -> dict:
  """Samples `num_samples` completions per problem from `model` and scores them."""
  problems = load_problems(data_dir)[:limit]
  if num_samples > 1 and temperature == 0.0:
    raise ValueError('num_samples > 1 with temperature 0 gives identical samples; set temperature')
  samples = model.generate([p.prompt for p in problems], max_new_tokens=max_new_tokens,
                           stop=list(STOP_SEQUENCES), temperature=temperature,
                           num_samples=num_samples)
  if len(samples) != len(problems):
    raise ValueError(f'model.generate returned {len(samples)} lists for {len(problems)} prompts')
  completions = [[truncate(c) for c in cs] for cs in samples]
  result = score(problems, completions, ks=ks, limits=limits, workers=workers)
  result['config'] = {'num_samples': num_samples, 'temperature': temperature,
                      'max_new_tokens': max_new_tokens, 'limit': limit,
                      'timeout_s': limits.timeout_s, 'memory_bytes': limits.memory_bytes}
  return result

