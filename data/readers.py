"""Reading local text and JSON-lines files, with one policy for bad input.

Bad input (invalid UTF-8, invalid JSON, a missing or non-string field, an empty document, an
over-long example) is handled by `BadInput`: with `on_bad_input='raise'` it raises
`BadInputError` naming the file and line; with 'skip' it drops the record, counts it by
reason, and logs the first few. Files may be gzip-compressed (`.gz`).
"""

import collections
import glob
import gzip
import json
import logging
import os
from typing import Any, Iterator

ON_BAD_INPUT = ('raise', 'skip')
UNITS = ('file', 'paragraph', 'line')
_LOGGED = 5  # Skipped records logged per reason; all are counted.


class BadInputError(ValueError):
  """A record that cannot be used; the message starts with 'file:line'."""


class BadInput:
  """Raises or counts bad records, as configured."""

  def __init__(self, on_bad_input: str = 'raise', log: bool = True):
    if on_bad_input not in ON_BAD_INPUT:
      raise ValueError(f'config.data.on_bad_input: {on_bad_input!r} is not one of {ON_BAD_INPUT}')
    self.policy = on_bad_input
    self.log = log
    self.counts = collections.Counter()

  def __call__(self, where: str, reason: str, message: str) -> None:
    if self.policy == 'raise':
      raise BadInputError(f'{where}: {message}')
    self.counts[reason] += 1
    if self.log and self.counts[reason] <= _LOGGED:
      logging.warning('skipping %s: %s (%s)', where, message, reason)


def expand(pattern: str, what: str = 'path') -> list[str]:
  """Sorted files matching `pattern` (a path or a glob); an error if there are none."""
  if glob.has_magic(pattern):
    paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
  else:
    paths = [pattern] if os.path.isfile(pattern) else []
  if not paths:
    raise FileNotFoundError(f'{what} {pattern!r} matches no file')
  return paths


def _open(path: str):
  return gzip.open(path, 'rb') if path.endswith('.gz') else open(path, 'rb')


def _lines(path: str, bad: BadInput) -> Iterator[tuple[int, str | None]]:
  """(line number, text without the newline) for each line; None where UTF-8 is invalid."""
  with _open(path) as f:
    for number, raw in enumerate(f, 1):
      try:
        yield number, raw.decode('utf-8').rstrip('\n')
      except UnicodeDecodeError as e:
        bad(f'{path}:{number}', 'invalid_utf8', f'invalid UTF-8 at byte {e.start} of the line')
        yield number, None


def iter_text(pattern: str, unit: str, bad: BadInput) -> Iterator[tuple[str, str]]:
  """(where, document) from text files: a whole file, a blank-line paragraph, or a line each.

  Blank lines separate paragraphs and lines; they are not documents. A document holding a
  line of invalid UTF-8 is dropped whole. An empty file (unit 'file') is bad input.
  """
  if unit not in UNITS:
    raise ValueError(f'text unit {unit!r} is not one of {UNITS}')
  for path in expand(pattern):
    current = None  # [first line number, lines, broken]
    for number, line in _lines(path, bad):
      blank = line is not None and not line.strip()
      if unit == 'line':
        if line is not None and not blank:
          yield f'{path}:{number}', line
        continue
      if unit == 'paragraph' and blank:
        if current and not current[2]:
          yield f'{path}:{current[0]}', '\n'.join(current[1])
        current = None
        continue
      if current is None:
        current = [number, [], False]
      if line is None:
        current[2] = True
      else:
        current[1].append(line)
    if unit == 'file' and (current is None or not '\n'.join(current[1]).strip()):
      if current is None or not current[2]:
        bad(f'{path}:1', 'empty', 'empty file')
    elif current and not current[2]:
      yield f'{path}:{current[0]}', '\n'.join(current[1])


def iter_jsonl(pattern: str, bad: BadInput) -> Iterator[tuple[str, dict[str, Any]]]:
  """(where, object) for each non-blank line of JSON-lines files."""
  for path in expand(pattern):
    for number, line in _lines(path, bad):
      if line is None or not line.strip():
        continue
      where = f'{path}:{number}'
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        bad(where, 'invalid_json', f'invalid JSON ({e.msg} at column {e.colno})')
        continue
      if not isinstance(obj, dict):
        bad(where, 'invalid_json', f'a JSON object was expected, got {type(obj).__name__}')
        continue
      yield where, obj


def get_field(obj: dict[str, Any], field: str, where: str, bad: BadInput,
              kind: type = str) -> Any:
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
  """(where, text) from the `field` of every JSON-lines record; empty texts are bad."""
  for where, obj in iter_jsonl(pattern, bad):
    text = get_field(obj, field, where, bad)
    if text is None:
      continue
    if not text.strip():
      bad(where, 'empty', f'field {field!r} is empty')
      continue
    yield where, text
