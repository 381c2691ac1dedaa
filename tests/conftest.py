"""Test set-up: an emulated 8-device CPU mesh and a persistent compilation cache.

The device count must be set before JAX starts, hence at the top of this file.
"""
import os

# Tests spend most of their time compiling small programs: LLVM's optimisation of the generated
# CPU code is switched off (cold suite ~40% faster, warm runs unchanged). Benchmarks and real
# runs keep XLA's defaults; HLO-level passes (fusion, sharding, buffer assignment) are the same.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0'
                           ' --xla_llvm_disable_expensive_passes=true').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_compilation_cache_dir',
                  os.environ.get('MESHLM_JAX_CACHE', os.path.expanduser('~/.cache/meshlm/jax_cache')))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get('SHARED_DATA', REPO.parent / 'shared' / 'data'))


@pytest.fixture
def shared_data():
  if not SHARED_DATA.is_dir():
    pytest.skip(f'shared data folder {SHARED_DATA} is absent (set SHARED_DATA to point at it)')
  return SHARED_DATA


# A run in which no test passed (nothing collected, everything skipped or deselected) must fail
# CI: count passes and turn such a session into pytest's "no tests ran" exit status. Under
# pytest-xdist the controller sees every worker's reports and decides; workers leave it alone.
_PASSED = []


def pytest_runtest_logreport(report):
  if report.when == 'call' and report.passed:
    _PASSED.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
  if hasattr(session.config, 'workerinput'):  # An xdist worker.
    return
  if exitstatus == 0 and not _PASSED:
    session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED
