"""Text hygiene: Unicode normalisation, exact deduplication, quality filters; all counted.

Each step is optional (`config.data.hygiene`, keys in `default_config`). Dedup needs the whole
corpus, so it runs where one exists: preparing a local corpus and reading SFT/preference files.
`Hygiene.check(text)` returns the cleaned text or None, counting why in `counts` ('kept', 'empty',
'too_short', 'too_long', 'low_alpha', 'repeated_lines', 'duplicate').
"""

import collections
import hashlib
import unicodedata

import ml_collections

NORMALIZATIONS = ('', 'NFC', 'NFKC')


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.normalize = ''  # '' (text as it is), 'NFC' or 'NFKC'.
  c.dedup = False  # Drop exact repeats (same SHA-256 of the normalised text); the first wins.
  c.min_chars = 0  # Length bounds (0: no bound).
  c.max_chars = 0
  c.min_alpha_ratio = 0.0  # Least share of letters among non-space characters (0: off).
  c.max_repeated_line_ratio = 1.0  # Most share of non-empty lines repeating an earlier one.
  return c


def alpha_ratio(text: str) -> float:
  """Share of letters among the characters that are not whitespace."""
  visible = [ch for ch in text if not ch.isspace()]
  return sum(ch.isalpha() for ch in visible) / len(visible) if visible else 0.0


def repeated_line_ratio(text: str) -> float:
  """Share of non-empty lines that are copies of an earlier line."""
  lines = [line.strip() for line in text.split('\n') if line.strip()]
  return 1.0 - len(set(lines)) / len(lines) if lines else 0.0


class Hygiene:
  """Applies the configured steps to one text at a time and counts the outcomes."""

  def __init__(self, cfg=None, **overrides):
    """`cfg`: a `config.data.hygiene` section (dict-like; default all off), `overrides` its keys."""
    c = ml_collections.ConfigDict({**(cfg or default_config()), **overrides})
    if c.normalize not in NORMALIZATIONS:
      raise ValueError(f'config.data.hygiene.normalize: {c.normalize!r} is not one of '
                       f'{NORMALIZATIONS}')
    # Plain attributes: ConfigDict look-ups are slow on a per-document path.
    self.normalize, self.dedup = c.normalize, bool(c.dedup)
    self.min_chars, self.max_chars = int(c.min_chars), int(c.max_chars)
    self.min_alpha_ratio = float(c.min_alpha_ratio)
    self.max_repeated_line_ratio = float(c.max_repeated_line_ratio)
    self.counts = collections.Counter()
    self._seen: set[bytes] = set()

  def check(self, text: str) -> str | None:
    text, reason = self.filter(text)
    self.counts[reason or 'kept'] += 1
    return None if reason else text

  def filter(self, text: str) -> tuple[str, str | None]:
    """(cleaned text, None) or (text, reason it is dropped); counts nothing."""
    if self.normalize:
      text = unicodedata.normalize(self.normalize, text)
    if not text.strip():
      return text, 'empty'
    if self.min_chars and len(text) < self.min_chars:
      return text, 'too_short'
    if self.max_chars and len(text) > self.max_chars:
      return text, 'too_long'
    if self.min_alpha_ratio and alpha_ratio(text) < self.min_alpha_ratio:
      return text, 'low_alpha'
    if self.max_repeated_line_ratio < 1.0 and (
        repeated_line_ratio(text) > self.max_repeated_line_ratio):
      return text, 'repeated_lines'
    if self.dedup:
      digest = hashlib.sha256(text.encode('utf-8', 'surrogatepass')).digest()[:16]
      if digest in self._seen:
        return text, 'duplicate'
      self._seen.add(digest)
    return text, None
