"""Post-training stage config: train/config.py's defaults plus `stage`, `rm`, `ppo`, `grpo`, `dpo`.

`stage`: 'sft' (the train loop as it is), 'rm', 'ppo', 'grpo' or 'dpo'. `train.init_from` is the
starting checkpoint, `train.steps` counts optimiser steps (RM, DPO) or RL iterations (PPO, GRPO),
`train.global_batch` is pairs per step (RM, DPO) or prompts per iteration (PPO, GRPO), `optim` is
the trained model's (PPO: the policy's). Every other step-counted key counts optimiser updates. GRPO
reads `grpo` and `ppo`'s rollout, clipping and KL keys (not the critic's, GAE's or RM's).
"""

import ml_collections

from model.config import ConfigError
from train import config as base_config

STAGES = ('sft', 'rm', 'ppo', 'grpo', 'dpo')
RL_STAGES = ('ppo', 'grpo')
KL_ESTIMATORS = ('k1', 'k3')
ENSEMBLE_COMBINES = ('mean', 'min')
CRITIC_INITS = ('reward_model', 'policy')


def defaults() -> ml_collections.ConfigDict:
  c = base_config.defaults()
  c.stage = ''
  c.rm = dict(
      margin=0.0,  # Loss -log sigmoid(r_chosen - r_rejected - margin).
      eval_batches=4,  # Held-out preference batches scored at the end (accuracy, margin).
  )
  c.ppo = dict(
      reward_model='',  # Workdir of the reward-model stage (its config.json and checkpoints).
      # Or a verifiable reward in its place, as grpo.reward (RLVR; the critic from the policy).
      reward='',
      # More reward-model workdirs, comma-separated: with ppo.reward_model an ensemble, each member
      # standardised on the reference's greedy held-out replies, then combined (Coste et al. 2023).
      reward_ensemble='',
      ensemble_combine='mean',  # 'mean' of the members, or 'min' (worst case).
      critic_init='reward_model',  # The critic's trunk and head: from the RM, or the policy trunk.
      max_prompt_len=64,  # Longer prompts are skipped.
      max_new_tokens=32,
      temperature=1.0,  # Rollout sampling (1.0 with no top-k/p: samples follow the policy).
      ppo_epochs=4,  # Passes over each rollout batch.
      num_minibatches=4,  # Per pass; each is one optimiser step.
      cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
      ent_coef=0.0,  # Entropy bonus: loss -= ent_coef * mean token entropy.
      gamma=1.0, lam=0.95,
      kl_coef=0.05,  # Initial (or fixed) coefficient of the per-token KL penalty.
      kl_estimator='k1',  # 'k1': logp - logp_ref; 'k3': (r - 1) - log r with r = p_ref / p.
      adaptive_kl=False,  # Ziegler et al. controller towards kl_target.
      kl_target=6.0, kl_horizon=10_000,
      whiten_rewards=False,
      missing_eos_penalty=0.0,  # Subtracted from the score of completions that never end.
      critic_lr=1e-5,  # Peak learning rate of the critic (same schedule shape as optim).
      critic_warmup=0,  # PPO: iterations that train the critic alone (the policy's lr held at 0).
      ref_on_host=False,  # Keep the frozen reference in host memory between uses.
      eval_prompts=64,  # Held-out prompts scored (greedy) before and after training.
      rollout_slots=0,  # Decode slots of the rollout engine; 0: every rollout of an iteration.
  )
  c.grpo = dict(
      num_generations=8,  # G completions sampled per prompt; advantages are relative to the group.
      scale_rewards=True,  # Divide by the group's reward std (False: Dr. GRPO's mean-only).
      # > 1: DAPO's dynamic sampling. Groups whose rewards all agree (no gradient but the KL's) are
      # replaced by groups of up to this many rounds of train.global_batch prompts in all.
      sampling_rounds=1,
      reward='embedded',  # 'embedded' | 'gsm8k' (exact checkers) | 'module:function' (rewards.py).
  )
  c.dpo = dict(
      beta=0.1,
      nll_weight=0.0,  # RPO: + this x the chosen reply's NLL per token (0: plain DPO).
      reference='',  # Checkpoint of the reference model; '' = train.init_from.
      precompute_ref=False,  # One reference pass over the run's batches first, then free it.
      eval_batches=4,
  )
  return c


def rollouts_per_iteration(config) -> int:
  """Completions sampled per RL iteration: prompts, times the group size for GRPO."""
  group = int(config.grpo.num_generations) if config.stage == 'grpo' else 1
  return int(config.train.global_batch) * group


def reward_models(config) -> list[str]:
  """PPO's reward-model workdirs: ppo.reward_model, then ppo.reward_ensemble's members."""
  p = config.ppo
  return [p.reward_model] + [d for d in p.reward_ensemble.split(',') if d]


def ppo_updates(config) -> int:
  """Optimiser steps of a PPO / GRPO run: iterations x epochs x minibatches (the schedule's)."""
  p = config.ppo
  return int(config.train.steps) * int(p.ppo_epochs) * int(p.num_minibatches)


def validate(config, num_devices: int, process_count: int = 1):
  """`defaults()`'s keys and train/config.py's checks, then the stage's; returns the ModelConfig."""
  base_config.check_keys(config, defaults())
  if config.stage not in STAGES:
    raise ConfigError(f'stage={config.stage!r}: use one of {STAGES}')
  shared = ml_collections.ConfigDict({k: v for k, v in config.to_dict().items()
                                     if k not in ('stage', 'rm', 'ppo', 'grpo', 'dpo')})
  if config.stage in RL_STAGES:  # The schedule counts optimiser updates, not iterations.
    shared.train.steps = ppo_updates(config)
  cfg = base_config.validate(shared, num_devices, process_count)
  if config.stage != 'sft' and not config.train.init_from:
    raise ConfigError(f'train.init_from: the {config.stage} stage starts from a checkpoint '
                      f'(the SFT model); set --config.train.init_from=DIR')
  if config.stage == 'ppo' and bool(config.ppo.reward_model) == bool(config.ppo.reward):
    raise ConfigError(f'ppo.reward_model={config.ppo.reward_model!r}, ppo.reward='
                      f'{config.ppo.reward!r}: set one (a reward-model run\'s workdir, or a '
                      f'verifiable reward)')
  if config.stage == 'ppo' and config.ppo.reward_ensemble and not config.ppo.reward_model:
    raise ConfigError(f'ppo.reward_ensemble={config.ppo.reward_ensemble!r}: its members join '
                      f'ppo.reward_model, which is not set')
  if config.stage == 'ppo' and config.ppo.ensemble_combine not in ENSEMBLE_COMBINES:
    raise ConfigError(f'ppo.ensemble_combine={config.ppo.ensemble_combine!r}: use one of '
                      f'{ENSEMBLE_COMBINES}')
  if config.stage == 'ppo' and config.ppo.reward and config.ppo.critic_init == 'reward_model':
    raise ConfigError(f'ppo.critic_init=reward_model: ppo.reward={config.ppo.reward!r} has no '
                      f'reward model; use ppo.critic_init=policy')
  if config.stage == 'grpo' and not config.grpo.num_generations >= 2:
    raise ConfigError(f'grpo.num_generations={config.grpo.num_generations}: a group needs >= 2')
  if config.stage == 'grpo' and not config.grpo.sampling_rounds >= 1:
    raise ConfigError(f'grpo.sampling_rounds={config.grpo.sampling_rounds} must be >= 1')
  if config.stage in RL_STAGES:
    p = config.ppo
    for key, allowed in (('kl_estimator', KL_ESTIMATORS), ('critic_init', CRITIC_INITS)):
      if p[key] not in allowed:
        raise ConfigError(f'ppo.{key}={p[key]!r}: use one of {allowed}')
    rollouts = rollouts_per_iteration(config)
    if p.num_minibatches < 1 or rollouts % p.num_minibatches:
      raise ConfigError(f'ppo.num_minibatches={p.num_minibatches} must divide the {rollouts} '
                        f'rollouts of an iteration (train.global_batch x grpo.num_generations)')
    minibatch = rollouts // p.num_minibatches
    if minibatch % config.train.grad_accum:
      raise ConfigError(f'train.grad_accum={config.train.grad_accum} must divide the PPO '
                        f'minibatch of {minibatch} rollouts')
    if p.rollout_slots < 0:
      raise ConfigError(f'ppo.rollout_slots={p.rollout_slots} must be >= 0 (0: all at once)')
    for key in ('ppo_epochs', 'max_new_tokens', 'max_prompt_len', 'critic_lr'):
      if not p[key] > 0:
        raise ConfigError(f'ppo.{key}={p[key]} must be > 0')
    if process_count > 1:
      raise ConfigError(f'distributed.num_processes={process_count}: {config.stage.upper()} runs '
                        f'on one process (its rollouts are not split over processes)')
    per_iteration = p.ppo_epochs * p.num_minibatches
    if config.train.ckpt_every % per_iteration:
      raise ConfigError(f'train.ckpt_every={config.train.ckpt_every}: {config.stage.upper()} saves '
                        f'between iterations; use a multiple of ppo.ppo_epochs x ppo.num_minibatches = {per_iteration}')
    if not 0 <= p.critic_warmup < config.train.steps:
      raise ConfigError(f'ppo.critic_warmup={p.critic_warmup} must be in [0, train.steps='
                        f'{config.train.steps}): iterations before the policy trains')
    if not 0 < p.lam <= 1 or not 0 < p.gamma <= 1:
      raise ConfigError(f'ppo.gamma={p.gamma} and ppo.lam={p.lam} must be in (0, 1]')
  if config.stage == 'dpo' and not config.dpo.beta > 0:
    raise ConfigError(f'dpo.beta={config.dpo.beta} must be positive')
  if config.stage == 'dpo' and not config.dpo.nll_weight >= 0:
    raise ConfigError(f'dpo.nll_weight={config.dpo.nll_weight} must be >= 0')
  if config.stage != 'sft' and config.data.packing != 'pad':
    raise ConfigError(f"data.packing={config.data.packing!r}: post-training keeps examples whole; "
                      f"use 'pad'")
  return cfg
