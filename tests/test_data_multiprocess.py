"""Two real JAX processes on localhost each build their part of the global batch.

Each worker joins a 2-process CPU cluster (gloo collectives), turns its process-local rows
into one global jax.Array with `jax.make_array_from_process_local_data`, gathers it, and
compares it with the batch a single process builds alone. Run directly, this file is the
worker.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

NUM_PROCESSES = 2
GLOBAL_BATCH = 8
STEPS = 3


def _config(workdir):
  from data import config as data_config  # pylint: disable=import-outside-toplevel
  cfg = data_config.default_config()
  cfg.update(seq_len=32, tokenizer_docs=300, embedded_docs=500, embedded_eval_docs=20)
  return cfg


def _worker(port: int, process_id: int, workdir: str) -> None:
  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  from data import pipeline  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(f'127.0.0.1:{port}', NUM_PROCESSES, process_id,
                             initialization_timeout=60)
  assert jax.process_count() == NUM_PROCESSES and jax.device_count() == 2 * NUM_PROCESSES
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  cfg = _config(workdir)
  local = pipeline.make_iterator(cfg, vocab_size=512, global_batch=GLOBAL_BATCH, workdir=workdir,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
  whole = pipeline.make_iterator(cfg, vocab_size=512, global_batch=GLOBAL_BATCH, workdir=workdir)
  for _ in range(STEPS):
    part, expected = next(local), next(whole)
    for key, rows in part.items():
      assert rows.shape[0] == GLOBAL_BATCH // NUM_PROCESSES
      global_array = jax.make_array_from_process_local_data(sharding, rows)
      assert global_array.shape == expected[key].shape
      gathered = multihost_utils.process_allgather(global_array, tiled=True)
      np.testing.assert_array_equal(gathered, expected[key], err_msg=key)
  print(json.dumps({'process': process_id, 'ok': True}), flush=True)
  jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_build_the_global_batch(tmp_path):
  from data import pipeline  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path)
  # Train the tokenizer once here, so that the workers only load it.
  pipeline.make_iterator(_config(workdir), vocab_size=512, global_batch=GLOBAL_BATCH,
                         workdir=workdir)
  port = _free_port()
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  env['PYTHONPATH'] = repo + os.pathsep + env.get('PYTHONPATH', '')
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port), str(i), workdir],
                            cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(NUM_PROCESSES)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=90)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f'process {i} failed:\n{out[-3000:]}'
    assert json.dumps({'process': i, 'ok': True}) in out


if __name__ == '__main__':
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
