"""PPO and GRPO: the per-token quantities and losses (the stage is in ppo_loop.py).

Arrays are per action, over the columns of a rollout shifted by one: entry j is the token in
column j + 1 of the sequence (prompt + completion), predicted from columns 0..j. `mask` is 1 on
the completion's tokens (EOS / end marker included), 0 on the prompt and on padding; the
completion is one contiguous run of 1s per row, and its last 1 ends the episode.

  per-token KL to the reference, from the sampled tokens (Schulman's estimators):
    k1 = logp - logp_ref               (unbiased, can be negative per token)
    k3 = (r - 1) - log r, r = p_ref/p  (unbiased, always >= 0, lower variance)
  rewards:   r_j = -kl_coef * kl_j, plus the reward model's score at the last action.
  GAE:       delta_j = r_j + gamma * V_{j+1} - V_j  (V after the last action = 0),
             A_j = delta_j + gamma * lam * A_{j+1};  returns R_j = A_j + V_j.
  policy:    ratio = exp(logp - logp_old);  loss = mean(max(-A ratio, -A clip(ratio, 1 +- eps)))
             over completion tokens (A whitened over the batch's completion tokens).
  value:     0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old, +- eps_v) - R)^2)).
  entropy:   mean token entropy of the policy; loss -= ent_coef * entropy.
  adaptive KL (Ziegler et al. 2019): kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon.

GRPO (Shao et al. 2024), no value model: the G completions of a prompt are a group; each gets
A = (score - group mean) / (group std + 1e-4) (std optional) on all its tokens; the loss is the
clipped policy loss plus kl_coef * the reference KL (k3), both means over completion tokens.

Metric names: docs/posttrain.md (they follow the reference RLHF libraries).
"""

import dataclasses

import jax
import jax.numpy as jnp


def masked_mean(x, mask, axis=None):
  return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def token_logprobs_and_entropy(logits_btv, tokens_bt):
  """(logp, entropy) [b, t-1] of the tokens in columns 1.. of whole sequences (module docstring)."""
  logp_btv = jax.nn.log_softmax(logits_btv[:, :-1].astype(jnp.float32), axis=-1)
  logp_bt = jnp.take_along_axis(logp_btv, tokens_bt[:, 1:, None], axis=-1)[..., 0]
  entropy_bt = -jnp.sum(jnp.exp(logp_btv) * logp_btv, axis=-1)
  return logp_bt, entropy_bt


def kl_penalty(logp_bt, ref_logp_bt, estimator: str):
  """Per-token KL(policy || reference) estimate from the sampled tokens."""
  if estimator == 'k1':
    return logp_bt - ref_logp_bt
  if estimator == 'k3':
    log_r = ref_logp_bt - logp_bt
    return jnp.expm1(log_r) - log_r
  raise ValueError(f'ppo.kl_estimator={estimator!r}: use k1 or k3')


def shaped_rewards(scores_b, kl_bt, mask_bt, kl_coef):
  """r_j = -kl_coef * kl_j on completion tokens, + the score at the last one."""
  rewards_bt = -kl_coef * kl_bt * mask_bt
  last_b = jnp.max(jnp.where(mask_bt > 0, jnp.arange(mask_bt.shape[1])[None, :], 0), axis=1)
  return rewards_bt.at[jnp.arange(rewards_bt.shape[0]), last_b].add(scores_b)


def gae(rewards_bt, values_bt, mask_bt, gamma: float, lam: float):
  """(advantages, returns) [b, t], zero outside the mask; see the module docstring."""
  next_mask_bt = jnp.concatenate([mask_bt[:, 1:], jnp.zeros_like(mask_bt[:, :1])], axis=1)
  next_values_bt = jnp.concatenate([values_bt[:, 1:], jnp.zeros_like(values_bt[:, :1])], axis=1)
  deltas_bt = rewards_bt + gamma * next_values_bt * next_mask_bt - values_bt

  def step(carry_b, xs):
    delta_b, next_mask_b = xs
    adv_b = delta_b + gamma * lam * carry_b * next_mask_b
    return adv_b, adv_b

  _, adv_tb = jax.lax.scan(step, jnp.zeros_like(rewards_bt[:, 0]),
                           (deltas_bt.T, next_mask_bt.T), reverse=True)
  advantages_bt = adv_tb.T * mask_bt
  return advantages_bt, (advantages_bt + values_bt) * mask_bt


def whiten(x_bt, mask_bt, shift_mean: bool = True):
  """(x - mean) / std over the masked entries (mean added back when not shift_mean)."""
  mean = masked_mean(x_bt, mask_bt)
  var = masked_mean((x_bt - mean) ** 2, mask_bt)
  return ((x_bt - mean) * jax.lax.rsqrt(var + 1e-8) + (0.0 if shift_mean else mean)) * mask_bt


@dataclasses.dataclass(frozen=True)
class LossConfig:
  cliprange: float = 0.2
  cliprange_value: float = 0.2
  vf_coef: float = 0.1
  ent_coef: float = 0.0


def ppo_losses(logp_bt, entropy_bt, values_bt, old, mask_bt, c: LossConfig):
  """(loss to minimise, metric dict) of one minibatch, means over its completion tokens.
  `old`: dict with the rollout's 'logprobs', 'values', 'advantages', 'returns' ([b, t])."""
  pg_loss, entropy, metrics = policy_loss(logp_bt, entropy_bt, old, mask_bt, c.cliprange)
  values_bt, old_values_bt, returns_bt, mask_bt = (jnp.asarray(x, jnp.float32) for x in (
      values_bt, old['values'], old['returns'], mask_bt))
  v_clipped_bt = old_values_bt + jnp.clip(values_bt - old_values_bt, -c.cliprange_value,
                                          c.cliprange_value)
  vf1_bt = (values_bt - returns_bt) ** 2
  vf2_bt = (v_clipped_bt - returns_bt) ** 2
  vf_loss = 0.5 * masked_mean(jnp.maximum(vf1_bt, vf2_bt), mask_bt)
  loss = pg_loss + c.vf_coef * vf_loss - c.ent_coef * entropy
  return loss, dict(metrics, **{
      'loss/value': vf_loss, 'loss/total': loss,
      'val/clipfrac': masked_mean((vf2_bt > vf1_bt).astype(jnp.float32), mask_bt)})


def policy_loss(logp_bt, entropy_bt, old, mask_bt, cliprange: float):
  """(clipped policy loss, mean entropy, metrics) against old 'logprobs' and 'advantages'."""
  logp_bt, mask_bt = jnp.asarray(logp_bt, jnp.float32), jnp.asarray(mask_bt, jnp.float32)
  logratio_bt = logp_bt - jnp.asarray(old['logprobs'], jnp.float32)
  ratio_bt = jnp.exp(logratio_bt)
  adv_bt = jnp.asarray(old['advantages'], jnp.float32)
  pg1_bt = -adv_bt * ratio_bt
  pg2_bt = -adv_bt * jnp.clip(ratio_bt, 1.0 - cliprange, 1.0 + cliprange)
  pg_loss = masked_mean(jnp.maximum(pg1_bt, pg2_bt), mask_bt)
  entropy = masked_mean(jnp.asarray(entropy_bt, jnp.float32), mask_bt)
  return pg_loss, entropy, {
      'loss/policy': pg_loss, 'policy/entropy': entropy,
      'policy/approxkl': 0.5 * masked_mean(logratio_bt ** 2, mask_bt),
      'policy/clipfrac': masked_mean((pg2_bt > pg1_bt).astype(jnp.float32), mask_bt),
      'val/ratio': masked_mean(ratio_bt, mask_bt)}


def group_advantages(scores_b, group: int, scale: bool = True):
  """float32 [b]: each score minus its group's mean (groups: consecutive runs of `group`),
  divided by the group's std + 1e-4 when `scale`."""
  scores_gn = jnp.asarray(scores_b, jnp.float32).reshape(-1, group)
  adv_gn = scores_gn - scores_gn.mean(axis=1, keepdims=True)
  if scale:
    adv_gn = adv_gn / (scores_gn.std(axis=1, keepdims=True) + 1e-4)
  return adv_gn.reshape(-1)


def grpo_losses(logp_bt, entropy_bt, old, mask_bt, c: LossConfig, kl_coef: float,
                estimator: str = 'k3'):
  """(loss, metrics) of one GRPO minibatch; `old` adds the rollout's 'ref_logprobs'."""
  pg_loss, entropy, metrics = policy_loss(logp_bt, entropy_bt, old, mask_bt, c.cliprange)
  kl = masked_mean(kl_penalty(jnp.asarray(logp_bt, jnp.float32),
                              jnp.asarray(old['ref_logprobs'], jnp.float32), estimator), mask_bt)
  loss = pg_loss + kl_coef * kl - c.ent_coef * entropy
  return loss, dict(metrics, **{'loss/kl': kl, 'loss/total': loss})


class AdaptiveKL:
  """Ziegler et al.'s proportional controller of the KL coefficient (fixed when target=None)."""

  def __init__(self, init: float, target: float | None = None, horizon: int = 10_000):
    self.value, self.target, self.horizon = float(init), target, horizon

  def update(self, current_kl: float, n_steps: int) -> float:
    if self.target is not None:
      error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
      self.value *= 1.0 + error * n_steps / self.horizon
    return self.value
