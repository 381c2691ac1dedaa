"""A persistent XLA compilation cache outside the repository (MESHLM_JAX_CACHE to move it)."""

import os

import jax


def enable(path: str | None = None) -> str:
  path = path or os.environ.get('MESHLM_JAX_CACHE', os.path.expanduser('~/.cache/meshlm/jax_cache'))
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  return path
