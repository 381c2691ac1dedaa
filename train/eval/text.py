"""Text helpers shared by the generative tasks."""


def truncate(text: str, stop: tuple[str, ...] | list[str]) -> str:
  """Cuts `text` at the earliest occurrence of any stop sequence (dropping the sequence)."""
  cut = len(text)
  for s in stop:
    if not s:
      raise ValueError('empty stop sequence')
    i = text.find(s)
    if i != -1:
      cut = min(cut, i)
  return text[:cut]
