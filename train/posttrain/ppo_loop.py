"""RLHF with PPO: rollouts from the policy, rewards from the reward model, KL to a frozen reference.

Models, all sharded on one mesh by the same logical rules (model/sharding.py):
  policy     Decoder, from `train.init_from` (the SFT model); trained with `optim`.
  reference  a frozen copy of the same checkpoint; with `ppo.ref_on_host` it waits in host
             memory (memory kind pinned_host) and is brought to the devices for each use.
  reward     ScalarModel from `ppo.reward_model` (an RM run's workdir; its own config.json).
  critic     a separate ScalarModel (not a head on the policy: the value loss then cannot pull
             the policy's features), from the reward model (`critic_init='reward_model'`, the
             usual choice) or the policy's trunk with a fresh head; trained with its own AdamW
             (peak `ppo.critic_lr`, same warm-up/cosine shape and clipping as `optim`).

One iteration (`train.steps` of them): `train.global_batch` prompts (user turns of the SFT
sources, chat template) -> completions sampled by train/generate.py at `ppo.temperature` ->
one forward each of policy (log-probs, entropy), reference (log-probs), critic (values), reward
model (score at the last token of prompt + completion laid out as in RM training) -> rewards,
GAE, whitened advantages (ppo.py) -> `ppo_epochs` passes of `num_minibatches` optimiser steps
over the batch, shuffled. Checkpoints hold the policy as `params`, so every LM tool (generate,
eval, the next stage) reads a PPO workdir like any other; the critic and optimiser states sit
beside it for resuming. Before the first and after the last iteration the mean reward of greedy
completions of `ppo.eval_prompts` held-out prompts is logged (eval/score_before, eval/score).
"""

import functools
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from data import chat as chat_lib
from data import sources
from data.tokenizer import Tokenizer
from model import decode
from model.heads import ScalarModel
from model.sharding import use_rules
from train import checkpoint as ckpt_lib
from train import config as base_config
from train import context as context_lib
from train import generate as gen_lib
from train import loop
from train import metrics as metrics_lib
from train import optimizer as optimizer_lib
from train import state as state_lib
from train import step as step_lib
from train import workdir as workdir_lib
from train.posttrain import config as pt_config
from train.posttrain import ppo, reward, setup

log = logging.getLogger('meshlm')
SHOWN = ('objective/scores', 'objective/kl', 'objective/rlhf_reward', 'objective/entropy',
         'policy/approxkl', 'policy/clipfrac', 'val/clipfrac', 'loss/value',
         'completions/mean_length')
ROLLOUT_KEYS = ('tokens', 'positions', 'segment_ids', 'mask', 'logprobs', 'values', 'advantages',
                'returns')


def load_prompts(config, template, split: str, workdir: str) -> list[list[int]]:
  """Token ids of the prompts (every turn before the last assistant reply, then the assistant
  marker) of the SFT sources, at most ppo.max_prompt_len long."""
  out = []
  for src in sources.build_all(config.data, split, workdir):
    if src.format != 'sft':
      raise base_config.ConfigError(f'config.data.sources.{src.name}: PPO prompts come from sft '
                                    f'sources, this one is {src.format!r}')
    for item in src.items:
      messages = item[1]
      last = max(i for i, m in enumerate(messages) if m['role'] == 'assistant')
      ids, _ = template.encode(messages[:last], generation_prompt=True)
      if len(ids) <= config.ppo.max_prompt_len:
        out.append([int(x) for x in ids])
  if not out:
    raise base_config.ConfigError(f'no {split} prompt fits ppo.max_prompt_len='
                                  f'{config.ppo.max_prompt_len}')
  return out


def reward_layout(lay: dict, num_new_b, prompt_len: int, end_id: int, newline: list[int]) -> dict:
  """Prompt + completion as the RM saw pairs in training (data/chat.py: a reply ends
  `<|end|>` + newline): the newline is appended to completions that ended with the marker."""
  b, s = lay['tokens'].shape
  k = len(newline)
  tokens = np.concatenate([lay['tokens'], np.zeros((b, k), np.int32)], axis=1)
  segs = np.concatenate([lay['segment_ids'], np.zeros((b, k), np.int32)], axis=1)
  positions = np.concatenate([lay['positions'], np.zeros((b, k), np.int32)], axis=1)
  for i in range(b):
    end = prompt_len + int(num_new_b[i])
    if num_new_b[i] and tokens[i, end - 1] == end_id:
      tokens[i, end:end + k] = newline
      segs[i, end:end + k] = 1
      positions[i, end:end + k] = positions[i, end - 1] + 1 + np.arange(k)
  return {'inputs': tokens, 'positions': positions, 'segment_ids': segs}


class Models:
  """The jitted forward passes over rollouts (each compiled once per rollout shape)."""

  def __init__(self, mdef, critic_mdef, rm_mdef):
    def logp(params, tokens, positions, segs):
      logits, _ = mdef.build(params)(tokens, positions, segs)
      return ppo.token_logprobs_and_entropy(logits, tokens)

    def values(params, tokens, positions, segs):
      return critic_mdef.build(params)(tokens, positions, segs)[0][:, :-1]

    def scores(params, rows):
      return reward.rewards(rm_mdef.build(params), rows)[0]

    self.logp, self.values, self.scores = jax.jit(logp), jax.jit(values), jax.jit(scores)


def advantages(rollout: dict, scores_b, kl_coef, p) -> dict:
  kl_bt = ppo.kl_penalty(rollout['logprobs'], rollout['ref_logprobs'], p.kl_estimator)
  mask = rollout['mask']
  rewards_bt = ppo.shaped_rewards(scores_b, kl_bt, mask, kl_coef)
  if p.whiten_rewards:
    rewards_bt = ppo.whiten(rewards_bt, mask, shift_mean=False)
  adv_bt, returns_bt = ppo.gae(rewards_bt, rollout['values'], mask, p.gamma, p.lam)
  return {'advantages': ppo.whiten(adv_bt, mask), 'returns': returns_bt,
          'kl_sum_b': jnp.sum(kl_bt * mask, axis=1)}


def update_loss(trainable, micro, rng, *, mdef, critic_mdef, loss_cfg):
  policy = mdef.build(trainable['policy'])
  logits, aux = policy(micro['tokens'], micro['positions'], micro['segment_ids'])
  logp_bt, entropy_bt = ppo.token_logprobs_and_entropy(logits, micro['tokens'])
  values_bt = critic_mdef.build(trainable['critic'])(micro['tokens'], micro['positions'],
                                                     micro['segment_ids'])[0][:, :-1]
  loss, metrics = ppo.ppo_losses(logp_bt, entropy_bt, values_bt, micro, micro['mask'], loss_cfg)
  count = jnp.sum(micro['mask'])
  total = (loss + aux.get('aux_loss', 0.0)) * count
  return total, (count, {k: v * count for k, v in dict(metrics, loss=loss).items()})


def update_step(state, batch, *, mdef, critic_mdef, loss_cfg, txs, schedules):
  """One PPO update by train/step.py's step: policy and critic are one trained tree
  {'policy', 'critic'} (opt_state alike), each with its own optimiser; a non-finite update is
  dropped as in every stage."""
  loss_fn = functools.partial(update_loss, mdef=mdef, critic_mdef=critic_mdef, loss_cfg=loss_cfg)
  norms = lambda g: {'policy/grad_norm': optax.tree.norm(g['policy']),
                     'val/grad_norm': optax.tree.norm(g['critic'])}
  new, metrics = step_lib.train_step(
      dict(state, params={'policy': state['params'], 'critic': state['critic']}), batch, None,
      make_loss=lambda _: loss_fn, tx=step_lib.per_key(txs), schedule=schedules['policy'],
      count_name='tokens', use_rng=False, grad_metrics=norms)
  return dict(new, params=new['params']['policy'], critic=new['params']['critic']), metrics


def optimizers(config, num_updates: int):
  critic_optim = ml_collections.ConfigDict(config.optim.to_dict())
  critic_optim.peak_lr = config.ppo.critic_lr
  txs = {'policy': optimizer_lib.make(config.optim, num_updates),
         'critic': optimizer_lib.make(critic_optim, num_updates)}
  schedules = {'policy': optimizer_lib.schedule(config.optim, num_updates),
               'critic': optimizer_lib.schedule(critic_optim, num_updates)}
  return txs, schedules


def run(config, workdir: str, stop_after: int | None = None) -> dict:
  """`config`: a stage config with data.tokenizer filled in (train/posttrain/__main__.py)."""
  loop.setup_logging()
  env = context_lib.make(config, workdir, pt_config.validate)
  cfg = env.cfg
  workdir_lib.write_config(config, workdir)
  t, p = config.train, config.ppo
  tok = Tokenizer(config.data.tokenizer)
  template = chat_lib.ChatTemplate(tok)
  rm_config = workdir_lib.load_config(None, workdir_lib.run_workdir(p.reward_model))
  rm_cfg = base_config.model_config(rm_config)
  critic_cfg = rm_cfg if p.critic_init == 'reward_model' else cfg
  num_updates = pt_config.ppo_updates(config)
  with jax.set_mesh(env.mesh), use_rules(env.rules):
    mdef, abstract = state_lib.model_def(cfg)
    critic_mdef, critic_abstract = state_lib.model_def(critic_cfg, ScalarModel)
    rm_mdef, _ = state_lib.model_def(rm_cfg, ScalarModel)
    txs, schedules = optimizers(config, num_updates)
    p_shard = env.param_shardings(mdef, abstract)
    c_shard = env.param_shardings(critic_mdef, critic_abstract)
    tx = step_lib.per_key(txs)  # As update_step applies them: Adam moments follow params.
    trained, trained_shard = ({'policy': abstract, 'critic': critic_abstract},
                              {'policy': p_shard, 'critic': c_shard})
    opt_abstract = jax.eval_shape(tx.init, trained)
    shardings = {'step': env.replicated, 'params': p_shard, 'critic': c_shard,
                 'opt_state': {k: optax.tree_map_params(
                     txs[k], lambda _, s: s, opt_abstract[k], trained_shard[k],
                     transform_non_params=lambda _: env.replicated) for k in txs},
                 'rng': env.replicated}
    rm_params = workdir_lib.restore_params(p.reward_model, rm_cfg, env, ScalarModel)
    ref_params = workdir_lib.restore_params(t.init_from, cfg, env)
    if p.ref_on_host:
      ref_params = jax.device_put(ref_params, jax.tree.map(
          lambda s: s.with_memory_kind('pinned_host'), p_shard))
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=t.ckpt_keep)
    if checkpointer.latest_step() is not None:
      like = {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': abstract,
              'critic': critic_abstract, 'opt_state': opt_abstract,
              'rng': jax.eval_shape(lambda: jax.random.PRNGKey(0))}
      state, data_state = checkpointer.restore(like, shardings)
      log.info('ppo: resuming from iteration %d', int(data_state['iteration']))
    else:
      policy = workdir_lib.restore_params(t.init_from, cfg, env)
      critic = (workdir_lib.restore_params(p.reward_model, critic_cfg, env, ScalarModel)
                if p.critic_init == 'reward_model'
                else setup.init_scalar_from_lm(t.init_from, cfg, env, t.seed))
      state = {'step': jnp.int32(0), 'params': policy, 'critic': critic,
               'opt_state': jax.jit(tx.init, out_shardings=shardings['opt_state'])(
                   {'policy': policy, 'critic': critic}),
               'rng': jax.random.PRNGKey(t.seed)}
      data_state = {'iteration': 0, 'kl_coef': float(p.kl_coef)}
    trainer = Trainer(config, cfg, env, tok, template, mdef, critic_mdef, rm_mdef, txs, schedules,
                      shardings, workdir)
    return trainer.train(state, data_state, ref_params, rm_params, checkpointer, p_shard,
                         stop_after)


class Trainer:
  """The PPO iterations of `run`, with its jitted pieces."""

  def __init__(self, config, cfg, env, tok, template, mdef, critic_mdef, rm_mdef, txs, schedules,
               shardings, workdir):
    self.config, self.env, self.tok, self.workdir = config, env, tok, workdir
    p = config.ppo
    self.end_id = tok.special_id('<|end|>')
    self.stop_ids = [tok.eos_id, self.end_id]
    self.newline = list(template.newline)
    self.prompts = load_prompts(config, template, 'train', workdir)
    self.eval_prompts = load_prompts(config, template, 'eval', workdir)[:p.eval_prompts]
    self.models = Models(mdef, critic_mdef, rm_mdef)
    self.generator = gen_lib.Generator(cfg, None, tok, env.mesh, env.rules,
                                       max_batch=config.train.global_batch)
    loss_cfg = ppo.LossConfig(p.cliprange, p.cliprange_value, p.vf_coef, p.ent_coef)
    self.update = jax.jit(
        lambda s, b: update_step(s, b, mdef=mdef, critic_mdef=critic_mdef, loss_cfg=loss_cfg,
                                 txs=txs, schedules=schedules),
        in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=0)
    self.advantages = jax.jit(lambda r, s, c: advantages(r, s, c, p))
    self.kl = ppo.AdaptiveKL(p.kl_coef, p.kl_target if p.adaptive_kl else None, p.kl_horizon)

  def rollout(self, policy, ref_params, rm_params, prompt_ids, *, seed, sampling, p_shard):
    """Sample completions and score them: (dict of [b, t] numpy arrays, scores, metrics)."""
    p = self.config.ppo
    out = self.generator.generate_ids(prompt_ids, max_new_tokens=p.max_new_tokens,
                                      sampling=sampling, stop_ids=self.stop_ids, seed=seed,
                                      params=policy)
    lay = out.layout()
    args = (lay['tokens'], lay['positions'], lay['segment_ids'])
    logprobs, entropy = self.models.logp(policy, *args)
    ref = ref_params
    if p.ref_on_host:
      ref = jax.device_put(ref_params, p_shard)
    ref_logprobs, _ = self.models.logp(ref, *args)
    del ref
    rows = reward_layout(lay, out.num_new_b, out.prompt_len, self.end_id, self.newline)
    scores = np.asarray(self.models.scores(rm_params, rows), np.float32)
    truncated = np.asarray([f == 'length' for f in out.finish_b])
    scores = scores - p.missing_eos_penalty * truncated
    mask = lay['response_mask'][:, 1:]
    batch = {'tokens': lay['tokens'], 'positions': lay['positions'],
             'segment_ids': lay['segment_ids'], 'mask': mask,
             'logprobs': np.asarray(logprobs), 'ref_logprobs': np.asarray(ref_logprobs)}
    metrics = {'objective/entropy': float(np.sum(np.asarray(entropy) * mask) / max(mask.sum(), 1)),
               'completions/mean_length': float(out.num_new_b.mean()),
               'completions/truncated_fraction': float(truncated.mean())}
    return batch, scores, metrics

  def mean_score(self, policy, ref_params, rm_params, p_shard) -> float:
    """Mean reward of greedy completions of the held-out prompts."""
    _, scores, _ = self.rollout(policy, ref_params, rm_params, self.eval_prompts, seed=0,
                                sampling=decode.Sampling(), p_shard=p_shard)
    return float(scores.mean())

  def train(self, state, data_state, ref_params, rm_params, checkpointer, p_shard,
            stop_after=None) -> dict:
    """The iterations from data_state['iteration']; the loop's promises hold per update (the
    step of train/step.py, train.nan_policy) and per iteration (SIGTERM or `stop_after`
    iterations: a checkpoint, then return)."""
    config, p, t = self.config, self.config.ppo, self.config.train
    self.kl.value = data_state['kl_coef']
    writer = metrics_lib.Writer(self.workdir, shown=SHOWN)
    start, skipped, eval_after = data_state['iteration'], 0, None
    progress = metrics_lib.Progress(t.progress, t.steps, start)
    stop = loop.StopSignal()
    sampling = decode.Sampling(temperature=p.temperature)
    b, num_mb = t.global_batch, p.num_minibatches
    order = np.random.default_rng(t.seed).permutation(len(self.prompts))
    eval_before = self.mean_score(state['params'], ref_params, rm_params, p_shard)
    log.info('ppo: mean reward of greedy completions of %d held-out prompts: %.4f',
             len(self.eval_prompts), eval_before)
    try:
      for it in range(start, t.steps):
        pick = [order[(it * b + j) % len(order)] for j in range(b)]
        batch, scores, metrics = self.rollout(
            state['params'], ref_params, rm_params, [self.prompts[i] for i in pick],
            seed=t.seed * 1_000_003 + it, sampling=sampling, p_shard=p_shard)
        batch['values'] = np.asarray(self.models.values(
            state['critic'], batch['tokens'], batch['positions'], batch['segment_ids']))
        kl_coef = self.kl.value
        adv = self.advantages({k: batch[k] for k in ('logprobs', 'ref_logprobs', 'mask',
                                                     'values')}, scores, kl_coef)
        batch['advantages'], batch['returns'] = np.asarray(adv['advantages']), np.asarray(
            adv['returns'])
        kl_sum = np.asarray(adv['kl_sum_b'])
        rng = np.random.default_rng([t.seed, it])
        updates = []
        for _ in range(p.ppo_epochs):
          perm = rng.permutation(b)
          for mb in np.split(perm, num_mb):
            # Replicated: a minibatch need not divide over the batch shards (one process).
            micro = step_lib.device_batch({k: batch[k][mb] for k in ROLLOUT_KEYS}, t.grad_accum,
                                          self.env.replicated)
            update = int(state['step'])
            state, m = self.update(state, micro)
            skipped += loop.check_finite((update, m), t.nan_policy)
            updates.append(m)
        metrics.update({k: float(np.mean([float(u[k]) for u in updates])) for k in updates[0]})
        metrics.update({
            'objective/kl': float(kl_sum.mean()), 'objective/scores': float(scores.mean()),
            'objective/non_score_reward': float(-kl_coef * kl_sum.mean()),
            'objective/rlhf_reward': float(scores.mean() - kl_coef * kl_sum.mean()),
            'objective/kl_coef': kl_coef, 'skipped_steps': skipped})
        self.kl.update(float(kl_sum.mean()), b)
        done = it + 1
        data_state = {'iteration': done, 'kl_coef': self.kl.value}
        logged = writer.scalars(done, metrics) if done % t.log_every == 0 or done == t.steps else None
        stop.requested |= stop_after is not None and done - start >= stop_after
        if done % t.ckpt_every == 0 or done == t.steps or stop.requested:
          checkpointer.save(done, state, data_state, force=True)
        progress.update(logged)
        if stop.requested:
          log.warning('stop requested: saved a checkpoint at iteration %d, exiting', done)
          break
      else:
        eval_after = self.mean_score(state['params'], ref_params, rm_params, p_shard)
        writer.scalars(t.steps, {'eval/score_before': eval_before, 'eval/score': eval_after})
    finally:
      checkpointer.close()
      writer.close()
      stop.restore()
      progress.close()
    return {'state': state, 'history': writer.history, 'eval/score_before': eval_before,
            'eval/score': eval_after}

