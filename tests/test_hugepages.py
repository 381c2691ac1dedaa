"""train/hugepages.py: the process re-executes once, same arguments, with the glibc tunable."""

import os
import pathlib
import subprocess
import sys

import pytest

from train import hugepages

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = """
import os, sys
from train import hugepages
print('start', flush=True)
hugepages.reexec()
print('after', os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:], flush=True)
"""


def run(env_extra):
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'} | env_extra
  env['PYTHONPATH'] = str(REPO)
  out = subprocess.run([sys.executable, '-c', SCRIPT, 'a', '--b=1'], env=env, text=True,
                       capture_output=True, timeout=60, check=True)
  return out.stdout.splitlines()


@pytest.mark.skipif(not hugepages.wanted() and 'glibc.malloc.hugetlb' not in
                    os.environ.get('GLIBC_TUNABLES', ''), reason='no transparent huge pages here')
def test_reexec_once_with_tunable_and_same_arguments():
  lines = run({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})
  # 'start' twice: the original process, then its replacement; 'after' once.
  assert lines[0] == lines[1] == 'start' and len(lines) == 3
  assert lines[2] == "after glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1 ['a', '--b=1']"


def test_opt_out_and_already_set_do_not_reexec():
  assert run({'MESHLM_HUGEPAGES': '0'}) == ['start', "after  ['a', '--b=1']"]
  assert run({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}) == [
      'start', "after glibc.malloc.hugetlb=1 ['a', '--b=1']"]
