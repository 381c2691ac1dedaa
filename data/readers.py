"""Reading local text and JSON-lines files (`.gz` too), with one policy for bad input and length.

Bad input (invalid UTF-8 or JSON, a missing or non-string field, an empty document, an over-long
example, a file unreadable to its end) goes to `BadInput`: 'raise' raises `BadInputError` naming
file:line; 'skip' drops, counts by reason and logs the first few. `BadInput(max_chars=N)` bounds
every document to N characters in time and memory (lines read in pieces of <= 4N bytes): longer
ones are split into N-character documents ('split'), cut ('truncate') or dropped ('skip'),
counted once as 'long_doc_<policy>'. JSON lines over 8N characters are bad input ('too_long').
"""

import codecs
import collections
import glob
import gzip
import json
import logging
import os
import zlib
from typing import Any, Iterator

ON_BAD_INPUT = ('raise', 'skip')
LONG_DOCS = ('split', 'truncate', 'skip')
UNITS = ('file', 'paragraph', 'line')
_LOGGED = 5  # Skipped records logged per reason; all are counted.


class BadInputError(ValueError):
  """A record that cannot be used; the message starts with 'file:line'."""


class BadInput:
  """Raises or counts bad records, as configured; and the bound on document length."""

  def __init__(self, on_bad_input: str = 'raise', log: bool = True, max_chars: int = 0,
               long_docs: str = 'split'):
    if on_bad_input not in ON_BAD_INPUT:
      raise ValueError(f'config.data.on_bad_input: {on_bad_input!r} is not one of {ON_BAD_INPUT}')
    if long_docs not in LONG_DOCS:
      raise ValueError(f'config.data.long_docs: {long_docs!r} is not one of {LONG_DOCS}')
    self.policy, self.log = on_bad_input, log
    self.max_chars, self.long_docs = int(max_chars), long_docs
    self.counts = collections.Counter()

  def __call__(self, where: str, reason: str, message: str) -> None:
    if self.policy == 'raise':
      raise BadInputError(f'{where}: {message}')
    self.counts[reason] += 1
    if self.log and self.counts[reason] <= _LOGGED:
      logging.warning('skipping %s: %s (%s)', where, message, reason)


def expand(pattern: str, what: str = 'path') -> list[str]:
  """Sorted files matching `pattern` (a path or a glob); an error if there are none."""
  paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
  if os.path.isdir(pattern):
    raise FileNotFoundError(f'{what} {pattern!r} is a directory; name a file or a glob such as '
                            f'{os.path.join(pattern, "*.txt")!r}')
  if not paths:
    raise FileNotFoundError(f'{what} {pattern!r} matches no file')
  return paths


def _lines(path: str, bad: BadInput) -> Iterator[tuple[int, str | None, bool]]:
  """(line number, text, ends) for each line without its newline, or for each piece of at most
  4 * bad.max_chars bytes of a longer one (`ends`: the piece ends its line). Text is None where
  UTF-8 is invalid, and where the file cannot be read further (the piece then ends the file)."""
  decoder = codecs.getincrementaldecoder('utf-8')()
  number, offset, ends = 1, 0, True

  def decode(raw: bytes, final: bool) -> str | None:
    try:
      return decoder.decode(raw, final).removesuffix('\n')
    except UnicodeDecodeError as e:
      bad(f'{path}:{number}', 'invalid_utf8', f'invalid UTF-8 at byte {offset + e.start} of the line')
      decoder.reset()
      return None

  try:
    with gzip.open(path, 'rb') if path.endswith('.gz') else open(path, 'rb') as f:
      for raw in iter(lambda: f.readline(4 * bad.max_chars or -1), b''):
        ends = raw.endswith(b'\n')
        yield number, decode(raw, ends), ends
        number, offset = (number + 1, 0) if ends else (number, offset + len(raw))
    if not ends:  # The last line had no newline.
      yield number, decode(b'', True), True
  except (EOFError, OSError, zlib.error) as e:  # A truncated or corrupt .gz, an I/O error.
    bad(f'{path}:{number}', 'unreadable', f'cannot be read from here on ({type(e).__name__}: {e})')
    yield number, None, True


class _Document:
  """One document as its text arrives, cut at `bad.max_chars` characters as `bad.long_docs` says.
  `add` and `end` yield the (where, text) documents they complete."""

  def __init__(self, where: str, bad: BadInput):
    self.where, self.bad = where, bad
    self.parts, self.size, self.pieces = [], 0, 0
    self.broken = self.cut = False  # broken: unreadable text seen; cut: truncated or skipped.

  def add(self, text: str | None) -> Iterator[tuple[str, str]]:
    self.broken |= text is None
    if self.broken or self.cut:
      return
    self.parts.append(text)
    self.size += len(text)
    limit = self.bad.max_chars
    while limit and self.size > limit:
      whole = ''.join(self.parts)
      self.bad.counts[f'long_doc_{self.bad.long_docs}'] += not self.pieces
      self.cut = self.bad.long_docs != 'split'
      if self.bad.long_docs != 'skip':
        yield self._label(), whole[:limit]
      self.pieces += 1
      self.parts, self.size = [whole[limit:]], len(whole) - limit
      if self.cut:
        return

  def end(self, empty_is_bad: bool = False) -> Iterator[tuple[str, str]]:
    text = ''.join(self.parts)
    if not (self.broken or self.cut) and text.strip():
      yield self._label(), text
    elif empty_is_bad and not (self.broken or self.pieces):
      self.bad(self.where, 'empty', 'empty file')

  def _label(self) -> str:
    return f'{self.where}+{self.pieces}' if self.pieces else self.where


def iter_text(pattern: str, unit: str, bad: BadInput) -> Iterator[tuple[str, str]]:
  """(where, document) from text files: a whole file, a blank-line paragraph, or a line each.
  Blank lines are not documents; a document holding a line of invalid UTF-8 is dropped (from
  that line on, if already split); an empty file (unit 'file') is bad input."""
  if unit not in UNITS:
    raise ValueError(f'text unit {unit!r} is not one of {UNITS}')
  for path in expand(pattern):
    doc, starts = None, True  # starts: the next piece begins a line.
    for number, text, ends in _lines(path, bad):
      blank = starts and ends and text is not None and not text.strip()
      if blank and unit == 'paragraph' and doc:
        yield from doc.end()
        doc = None
      elif not blank or unit == 'file':
        if doc is None:
          doc = _Document(f'{path}:{number}', bad)
        elif starts:
          yield from doc.add('\n')
        yield from doc.add(text)
        if unit == 'line' and ends:
          yield from doc.end()
          doc = None
      starts = ends
    if doc or unit == 'file':
      yield from (doc or _Document(f'{path}:1', bad)).end(empty_is_bad=unit == 'file')


def iter_jsonl(pattern: str, bad: BadInput) -> Iterator[tuple[str, dict[str, Any]]]:
  """(where, object) for each non-blank line of JSON-lines files."""
  for path in expand(pattern):
    line = []  # Pieces of the line being read; None once it is too long.
    for number, text, ends in _lines(path, bad):
      where = f'{path}:{number}'
      if line is not None:
        line.append(text)
        if bad.max_chars and sum(len(p or '') for p in line) > 8 * bad.max_chars:
          bad(where, 'too_long', f'line longer than {8 * bad.max_chars} characters '
              f'(8 x data.max_doc_chars)')
          line = None
      if not ends:
        continue
      pieces, line = line, []
      if pieces is None or None in pieces or not ''.join(pieces).strip():
        continue
      try:
        obj = json.loads(''.join(pieces))
      except json.JSONDecodeError as e:
        bad(where, 'invalid_json', f'invalid JSON ({e.msg} at column {e.colno})')
        continue
      if not isinstance(obj, dict):
        bad(where, 'invalid_json', f'a JSON object was expected, got {type(obj).__name__}')
        continue
      yield where, obj


def get_field(obj: dict[str, Any], field: str, where: str, bad: BadInput, kind: type = str) -> Any:
  """`obj[field]` (dots walk into nested objects), or None after reporting it as bad."""
  value: Any = obj
  for key in field.split('.'):
    if not isinstance(value, dict) or key not in value:
      bad(where, 'missing_field', f'field {field!r} is missing')
      return None
    value = value[key]
  if not isinstance(value, kind):
    bad(where, 'missing_field', f'field {field!r} is a {type(value).__name__}, '
        f'not a {kind.__name__}')
    return None
  return value


def iter_jsonl_text(pattern: str, field: str, bad: BadInput) -> Iterator[tuple[str, str]]:
  """(where, text) from `field` of each JSON-lines record (cut as `bad` says; empty is bad)."""
  for where, obj in iter_jsonl(pattern, bad):
    text = get_field(obj, field, where, bad)
    if text is None:
      continue
    if not text.strip():
      bad(where, 'empty', f'field {field!r} is empty')
      continue
    doc = _Document(where, bad)
    yield from doc.add(text)
    yield from doc.end()
