"""optax: linear warm-up, cosine decay; AdamW (no decay on norms, biases); global-norm clipping."""

import jax
import optax


def schedule(optim_cfg, total_steps: int, delay: int = 0) -> optax.Schedule:
  """0 -> peak over `warmup_steps`, then cosine to `final_lr_frac * peak` at `total_steps`; with
  `delay`, 0 for the first `delay` steps and that shape over the remaining `total_steps - delay`."""
  peak = optim_cfg.peak_lr
  shape = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=optim_cfg.warmup_steps,
      decay_steps=max(total_steps - delay, optim_cfg.warmup_steps + 1),
      end_value=optim_cfg.final_lr_frac * peak)
  return optax.join_schedules([optax.constant_schedule(0.0), shape], [delay]) if delay else shape


def decay_mask(params):
  """Weight decay on matrices only: norm scales and biases (rank <= 1 per layer) are exempt."""
  def wants_decay(path, x):
    name = str(getattr(path[-1], 'key', path[-1]))
    return not (name == 'scale' or name.startswith('bias'))
  return jax.tree_util.tree_map_with_path(wants_decay, params)


def make(optim_cfg, total_steps: int, delay: int = 0) -> optax.GradientTransformation:
  adamw = optax.adamw(schedule(optim_cfg, total_steps, delay), b1=optim_cfg.b1, b2=optim_cfg.b2,
                      eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay, mask=decay_mask)
  if optim_cfg.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim_cfg.clip_norm), adamw)
  return adamw
