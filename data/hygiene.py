"""Text hygiene: Unicode normalisation, exact deduplication, quality filters; all counted.

Each step is optional (config keys under `config.data.hygiene`, see data.config):
  normalize          '' (keep bytes as they are), 'NFC' or 'NFKC'.
  dedup              drop exact repeats (same SHA-256 of the normalised text); the first wins.
                     Needs a view of the whole corpus, so it runs where one exists: when a
                     local corpus is prepared and when SFT/preference files are read.
  min_chars/max_chars  length bounds (0 = no bound).
  min_alpha_ratio    least share of letters among non-space characters (0 = off).
  max_repeated_line_ratio  most share of non-empty lines that repeat an earlier line (1 = off).

`Hygiene.check(text)` returns the cleaned text or None, and counts why in `counts`
(keys: 'kept', 'empty', 'too_short', 'too_long', 'low_alpha', 'repeated_lines', 'duplicate').
"""

import collections
import hashlib
import unicodedata

import ml_collections

NORMALIZATIONS = ('', 'NFC', 'NFKC')


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.normalize = ''
  c.dedup = False
  c.min_chars = 0
  c.max_chars = 0
  c.min_alpha_ratio = 0.0
  c.max_repeated_line_ratio = 1.0
  return c


def alpha_ratio(text: str) -> float:
  """Share of letters among the characters that are not whitespace."""
  visible = [ch for ch in text if not ch.isspace()]
  return sum(ch.isalpha() for ch in visible) / len(visible) if visible else 0.0


def repeated_line_ratio(text: str) -> float:
  """Share of non-empty lines that are copies of an earlier line."""
  lines = [line.strip() for line in text.split('\n') if line.strip()]
  return 1.0 - len(set(lines)) / len(lines) if lines else 0.0


def content_hash(text: str) -> bytes:
  return hashlib.sha256(text.encode('utf-8', 'surrogatepass')).digest()[:16]


class Hygiene:
  """Applies the configured steps to one text at a time and counts the outcomes."""

  def __init__(self, cfg: ml_collections.ConfigDict | None = None):
    cfg = cfg or default_config()
    if cfg.normalize not in NORMALIZATIONS:
      raise ValueError(f'config.data.hygiene.normalize: {cfg.normalize!r} is not one of '
                       f'{NORMALIZATIONS}')
    self.cfg = cfg
    # Plain attributes: ConfigDict look-ups are slow on a per-document path.
    self.normalize, self.dedup = cfg.normalize, bool(cfg.dedup)
    self.min_chars, self.max_chars = int(cfg.min_chars), int(cfg.max_chars)
    self.min_alpha_ratio = float(cfg.min_alpha_ratio)
    self.max_repeated_line_ratio = float(cfg.max_repeated_line_ratio)
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
    reason = None
    if not text.strip():
      reason = 'empty'
    elif self.min_chars and len(text) < self.min_chars:
      reason = 'too_short'
    elif self.max_chars and len(text) > self.max_chars:
      reason = 'too_long'
    elif self.min_alpha_ratio and alpha_ratio(text) < self.min_alpha_ratio:
      reason = 'low_alpha'
    elif self.max_repeated_line_ratio < 1.0 and (
        repeated_line_ratio(text) > self.max_repeated_line_ratio):
      reason = 'repeated_lines'
    elif self.dedup:
      digest = content_hash(text)
      if digest in self._seen:
        reason = 'duplicate'
      else:
        self._seen.add(digest)
    return text, reason
