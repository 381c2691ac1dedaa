"""Parameter counts of the published configs, from jax.eval_shape only (nothing allocated)."""

import resource

from experiments import dense_65b
from model import count_params
from train.config import model_config


def test_dense_65b_within_3_percent():
  rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  counts = count_params(model_config(dense_65b.get_config()))
  assert counts.total == 66_858_524_672
  assert abs(counts.total - 65e9) / 65e9 < 0.03
  assert counts.active == counts.total
  # 67B float32 parameters would be 267 GB; eval_shape must not have allocated them.
  grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
  assert grown_kib < 2 * 1024 * 1024
