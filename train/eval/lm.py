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
    """For each prompt, `num_samples` continuations (without the prompt).

    Generation may end at the first stop sequence; callers cut at stop sequences themselves,
    so returning text past one is allowed. temperature 0 is greedy decoding.
    """
    ...
