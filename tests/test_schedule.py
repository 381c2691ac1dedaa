"""Learning-rate schedule and optimizer set-up, checked against the formula."""

import math

import jax.numpy as jnp
import numpy as np

from experiments import dense_65b
from train import optimizer


def expected_lr(step, peak, warmup, total, final_frac):
  if step < warmup:
    return peak * step / warmup
  progress = (step - warmup) / (total - warmup)
  end = final_frac * peak
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))


def test_dense_65b_schedule_matches_formula():
  c = dense_65b.get_config()
  total = c.train.steps
  sched = optimizer.schedule(c.optim, total)
  mid = 2000 + (total - 2000) // 2
  for step in (0, 1000, 2000, mid, total - 1000, total):
    np.testing.assert_allclose(float(sched(step)), expected_lr(step, 2e-5, 2000, total, 0.1),
                               rtol=1e-5, atol=1e-12)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(2000)), 2e-5, rtol=1e-6)
  np.testing.assert_allclose(float(sched(mid)), 0.55 * 2e-5, rtol=1e-3)  # Halfway down the cosine.
  np.testing.assert_allclose(float(sched(total)), 2e-6, rtol=1e-5)  # Ends at 10% of peak.


def test_delayed_schedule_is_zero_then_the_same_shape():
  """delay (PPO's critic warm-up): 0 for `delay` steps, then the schedule of total - delay steps."""
  c = dense_65b.get_config().optim
  delayed, plain = optimizer.schedule(c, 10_000, delay=500), optimizer.schedule(c, 9_500)
  assert [float(delayed(s)) for s in (0, 250, 499)] == [0.0, 0.0, 0.0]
  for step in (500, 1500, 2500, 6000, 10_000):
    np.testing.assert_allclose(float(delayed(step)), float(plain(step - 500)), rtol=1e-6)
  np.testing.assert_allclose(float(delayed(2500)), 2e-5, rtol=1e-6)  # Peak after its warm-up.


def test_weight_decay_skips_norms():
  params = {'layers': {'attn_norm': {'scale': jnp.ones(3)}, 'mlp': {'up_df': jnp.ones((3, 3))}}}
  mask = optimizer.decay_mask(params)
  assert mask == {'layers': {'attn_norm': {'scale': False}, 'mlp': {'up_df': True}}}
