"""Multi-process start-up: `jax.distributed.initialize` from config, or auto-detected.

`distributed.enabled=True` with an explicit coordinator_address / num_processes / process_id
starts JAX's distributed runtime with those values; with them left empty, JAX auto-detects
SLURM, Open MPI and Cloud TPU environments. On CPU the collectives go through gloo.
"""

import logging

import jax

log = logging.getLogger('meshlm')


def maybe_initialize(dist_cfg) -> None:
  if not dist_cfg.enabled or jax.distributed.is_initialized():
    return
  kwargs = {}
  if dist_cfg.coordinator_address:
    kwargs['coordinator_address'] = dist_cfg.coordinator_address
  if dist_cfg.num_processes > 0:
    kwargs['num_processes'] = dist_cfg.num_processes
  if dist_cfg.process_id >= 0:
    kwargs['process_id'] = dist_cfg.process_id
  if jax.config.jax_platforms in (None, '', 'cpu') or 'cpu' in str(jax.config.jax_platforms):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kwargs)
  log.info('jax.distributed: process %d of %d, %d local / %d global devices', jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
