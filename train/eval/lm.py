"""The only thing the benchmarks need from a model: scoring continuations and sampling text."""

from typing import Protocol, runtime_checkable


@runtime_checkable
class LanguageModel(Protocol):
  """A text-in, text-out model; tokenisation, batching and devices are its own business."""

  def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]:
    """For each (context, continuation): log p(continuation | context), summed over its tokens."""
    ...

  def generate(self, prompts: list[str], *, max_new_tokens: int, stop: list[str],
               temperature: float = 0.0, num_samples: int = 1) -> list[list[str]]:
    """For each prompt, `num_samples` continuations (without the prompt); temperature 0 is
    greedy. Text past a stop sequence may come back: callers cut it with `truncate`."""
    ...


def truncate(text: str, stop: tuple[str, ...] | list[str]) -> str:
  """Cuts `text` at the earliest occurrence of any stop sequence (dropping the sequence)."""
  if not all(stop):
    raise ValueError('empty stop sequence')
  return text[:min([text.find(s) for s in stop if s in text], default=len(text))]
