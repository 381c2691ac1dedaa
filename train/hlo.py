"""Collectives of a compiled program, per executed step, from its optimised HLO text.

`collectives(compiled.as_text(), num_devices)` walks the call graph from the entry computation and
counts each collective (KINDS) as often as it runs: once per iteration of a `while` body, whose trip
count is read from its condition (`compare(counter, constant(N)), direction=LT`); an unreadable loop
counts once and is reported in `unknown_trip_counts`.

XLA:TPU's reduce-scatter, a fusion calling an `all-reduce-scatter*` computation (an all-reduce whose
result is sliced), counts as one reduce-scatter. Async pairs (`*-start` / `*-done`) count at their
start, whose type lists operands and results.

Per op, `bytes` is its result's size on one device and `moved` what one device sends with the
bandwidth-optimal ring algorithm over its group of n: all-gather and all-to-all (n-1)/n of the
result, reduce-scatter n-1 results (its input is n), all-reduce 2 (n-1)/n, collective-permute 1.
"""

import dataclasses
import math
import re

KINDS = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 's16': 2, 'u16': 2,
                'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8,
                'c64': 8, 'c128': 16, 's4': 0.5, 'u4': 0.5}
_HEADER = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$')
_OPCODE = re.compile(rf'\s((?:{"|".join(KINDS)})(?:-start)?'
                     r'|while|fusion|call|conditional|async-start)\(')
_ARRAY = re.compile(r'\b([a-z]+[0-9]*(?:e[0-9]m[0-9](?:fn)?)?)\[([0-9,]*)\]')
_CALLEES = re.compile(r'(?:calls|true_computation|false_computation)=%?([\w.\-]+)')  # Not to_apply: reducers.
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')


@dataclasses.dataclass
class Collective:
  count: int = 0
  bytes: float = 0.0  # Result bytes per device, summed over executions.
  moved: float = 0.0  # Ring-algorithm bytes sent per device, summed over executions.
  moved_wide: float = 0.0  # The part of `moved` in groups larger than `local_size` devices.


@dataclasses.dataclass
class Collectives:
  by_kind: dict  # kind -> Collective, for every kind in KINDS.
  unknown_trip_counts: int  # While loops whose trip count could not be read (counted once).


def _computations(text: str) -> tuple[dict, str]:
  comps, entry, name = {}, None, None
  for line in text.splitlines():
    if name is None:
      if m := _HEADER.match(line):
        name = m.group(1)
        comps[name] = []
        if line.startswith('ENTRY'):
          entry = name
    elif line.rstrip() == '}':  # Attribute text inside an instruction may start a line with '}}'.
      name = None
    else:
      comps[name].append(line)
  if entry is None:
    raise ValueError('train/hlo.py: no ENTRY computation in the HLO text')
  return comps, entry


def _result_bytes(kind: str, total: float, n: int, is_start: bool) -> float:
  """The collective's result bytes. An async start's type holds operands and results:
  all-gather (x, n x) -> n/(n+1) of it, reduce-scatter (n x, x) -> 1/(n+1), all-to-all and
  collective-permute (x, x) -> 1/2; an all-reduce start holds its results only."""
  if not is_start or kind == 'all-reduce':
    return total
  n = max(n, 1)
  return {'all-gather': total * n / (n + 1), 'reduce-scatter': total / (n + 1)}.get(kind, total / 2)


def group_size(line: str, num_devices: int) -> int:
  """Devices per replica group of a collective instruction."""
  if m := re.search(r'replica_groups=\[(\d+),(\d+)\]<=', line):
    return int(m.group(2))
  if m := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line):
    sizes = dict((k.strip("' "), int(v)) for k, v in
                 (kv.split('=') for kv in m.group(1).split(',') if '=' in kv))
    return math.prod(sizes.get(a.strip("' "), 1) for a in m.group(2).split(',') if a.strip())
  if m := re.search(r'replica_groups=\{\{([^}]*)\}', line):
    return len(m.group(1).split(','))
  return num_devices


def _trip_count(cond_lines: list[str]) -> int | None:
  constants = (int(c) for l in cond_lines for c in re.findall(r'= s32\[\]\S* constant\((\d+)\)', l))
  return max(constants, default=None) if any('direction=LT' in l for l in cond_lines) else None


def _moved(kind: str, result: float, n: int) -> float:
  if n <= 1:
    return 0.0
  return {'all-gather': result * (n - 1) / n, 'all-to-all': result * (n - 1) / n,
          'reduce-scatter': result * (n - 1), 'all-reduce': 2 * result * (n - 1) / n,
          'collective-permute': result}[kind]


def collectives(text: str, num_devices: int, local_size: int | None = None) -> Collectives:
  """`local_size`: devices joined by the fast local interconnect (a GPU host's NVLink); the
  bytes of larger groups are also summed as `moved_wide` (default: all devices are local)."""
  local_size = num_devices if local_size is None else local_size
  comps, entry = _computations(text)
  by_kind = {k: Collective() for k in KINDS}
  unknown = [0]

  def add(kind, line, start, times, n, is_start=False):
    arrays = _ARRAY.findall(line[line.index('=') + 1:start])  # The result type, before the opcode.
    total = sum(math.prod(int(d) for d in dims.split(',') if d) * _DTYPE_BYTES.get(dtype, 4)
                for dtype, dims in arrays)
    result = _result_bytes(kind, float(total), n, is_start)
    c, moved = by_kind[kind], times * _moved(kind, result, n)
    c.count += times
    c.bytes += times * result
    c.moved += moved
    c.moved_wide += moved if n > local_size else 0.0

  def walk(name: str, times: int):
    for line in comps.get(name, ()):
      m = _OPCODE.search(line)
      if not m or '=' not in line[:m.start()]:
        continue
      op = m.group(1)
      if op == 'while':
        body = re.search(r'body=%?([\w.\-]+)', line).group(1)
        cond = re.search(r'condition=%?([\w.\-]+)', line).group(1)
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        trips = int(known.group(1)) if known else _trip_count(comps.get(cond, []))
        unknown[0] += trips is None  # Counted once.
        walk(body, times * (1 if trips is None else trips))
        continue
      kind = op.removesuffix('-start')
      if kind in KINDS:
        add(kind, line, m.start(), times, group_size(line, num_devices), op.endswith('-start'))
        continue
      callees = _CALLEES.findall(line)
      if b := _BRANCHES.search(line):
        callees += [c.strip().lstrip('%') for c in b.group(1).split(',') if c.strip()]
      scatter = [c for c in callees if c.startswith('all-reduce-scatter')]
      if op == 'fusion' and scatter:
        inner = next((l for l in comps.get(scatter[0], ()) if ' all-reduce(' in l), '')
        add('reduce-scatter', line, m.start(), times, n=group_size(inner, num_devices))
        continue
      for callee in callees:
        walk(callee, times)

  walk(entry, 1)
  return Collectives(by_kind=by_kind, unknown_trip_counts=unknown[0])
