"""Transparent huge pages for host buffers: CPU runs re-execute themselves with them on.

On XLA:CPU every step allocates its large buffers (logits, their gradient, ...) afresh, and
Linux maps fresh memory 4 KiB page by page (the cost: benchmarks/results/dense_cpu.md). glibc
(>= 2.35) asks for transparent huge pages on large allocations when started with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1, read only at process start. So the CLIs call `reexec()`
first thing: if the variable is missing and the kernel offers THP (`madvise` or `always`), the
process replaces itself (same pid, same arguments) with one that has it. Opt out with
MESHLM_HUGEPAGES=0; notebooks set GLIBC_TUNABLES themselves before starting Jupyter.
"""

import os
import sys

_TUNABLE = 'glibc.malloc.hugetlb=1'
_THP = '/sys/kernel/mm/transparent_hugepage/enabled'


def wanted() -> bool:
  if sys.platform != 'linux' or os.environ.get('MESHLM_HUGEPAGES', '1') == '0':
    return False
  if 'glibc.malloc.hugetlb' in os.environ.get('GLIBC_TUNABLES', ''):
    return False  # Already set (by us or by the user): never loop.
  try:
    with open(_THP) as f:
      mode = f.read()
  except OSError:
    return False
  return '[never]' not in mode


def reexec() -> None:
  """Replace this process with the same command plus the huge-page tunable, when wanted."""
  if not wanted():
    return
  env = dict(os.environ)
  env['GLIBC_TUNABLES'] = ':'.join(filter(None, [env.get('GLIBC_TUNABLES', ''), _TUNABLE]))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
