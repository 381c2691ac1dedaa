"""Transparent huge pages for host buffers: CPU runs re-execute themselves with them on (README).

glibc >= 2.35 asks for transparent huge pages on large allocations under
GLIBC_TUNABLES=glibc.malloc.hugetlb=1, read only at process start; so the CLIs call `reexec()`
first: if the variable is missing and the kernel offers THP, the process replaces itself (same
pid and arguments) with one that has it. MESHLM_HUGEPAGES=0 opts out.
"""

import os
import sys

_TUNABLE = 'glibc.malloc.hugetlb=1'
_THP = '/sys/kernel/mm/transparent_hugepage/enabled'


def wanted() -> bool:
  if (sys.platform != 'linux' or os.environ.get('MESHLM_HUGEPAGES', '1') == '0'
      or 'glibc.malloc.hugetlb' in os.environ.get('GLIBC_TUNABLES', '')):  # Set: never loop.
    return False
  try:
    with open(_THP) as f:
      return '[never]' not in f.read()
  except OSError:
    return False


def reexec() -> None:
  """Replace this process with the same command plus the huge-page tunable, when wanted."""
  if not wanted():
    return
  tunables = ':'.join(filter(None, [os.environ.get('GLIBC_TUNABLES', ''), _TUNABLE]))
  env = {**os.environ, 'GLIBC_TUNABLES': tunables}
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
