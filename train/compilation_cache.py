"""A persistent XLA compilation cache outside the repository (MESHLM_JAX_CACHE to move it)."""

import os

import jax


def enable() -> None:
  default = os.path.expanduser('~/.cache/meshlm/jax_cache')
  jax.config.update('jax_compilation_cache_dir', os.environ.get('MESHLM_JAX_CACHE', default))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
