"""RLHF with PPO, and GRPO: stages of the one loop (train/loop.py). Rollouts from the policy,
rewards from the reward model (PPO) or a verifiable reward (GRPO, and PPO with `ppo.reward`;
rewards.py), KL to a frozen reference. GRPO is PPO without critic or reward model, advantages
relative to the group (ppo.py).

Models, on one mesh by the same logical rules (keys: config.py): the policy (`train.init_from`,
`optim`), the frozen reference (the same checkpoint; `ppo.ref_on_host`), the reward model
(`ppo.reward_model`, with `ppo.reward_ensemble`'s members), the critic (a ScalarModel per
`ppo.critic_init`, AdamW at `ppo.critic_lr`).

One iteration: `train.global_batch` prompts -> completions at `ppo.temperature` (GRPO: G each;
groups whose rewards all agree replaced from up to `grpo.sampling_rounds` rounds of prompts) ->
log-probs, reference log-probs, values, scores -> rewards, GAE, whitened advantages (ppo.py) ->
`ppo_epochs` x `num_minibatches` shuffled updates. The rollout is the stage's `before_step`; a loop
step is one update of {'params': policy, 'critic'}. Checkpoints fall between iterations; with the
data state {'iteration', 'cursor' (prompts taken), 'kl_coef', 'score_before'} resume is
bit-identical. eval/score (eval/score_before: of the initial policy): the mean reward of greedy
completions of `ppo.eval_prompts` held-out prompts.
"""

import functools
import logging

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
from train import config as base_config
from train import generate as gen_lib
from train import optimizer as optimizer_lib
from train import stage as stage_lib
from train import state as state_lib
from train import step as step_lib
from train import workdir as workdir_lib
from train.posttrain import config as pt_config
from train.posttrain import ppo, reward, rewards

log = logging.getLogger('meshlm')
SHOWN = ('objective/scores', 'objective/kl', 'objective/rlhf_reward', 'objective/entropy',
         'policy/approxkl', 'policy/clipfrac', 'val/clipfrac', 'loss/value',
         'completions/mean_length')
GRPO_SHOWN = ('objective/scores', 'objective/kl', 'objective/zero_std_fraction',
              'objective/sampling_rounds', 'policy/clipfrac', 'loss/kl', 'completions/mean_length')
ROLLOUT_KEYS = ('tokens', 'positions', 'segment_ids', 'mask', 'logprobs', 'values', 'advantages',
                'returns')
GRPO_KEYS = ('tokens', 'positions', 'segment_ids', 'mask', 'logprobs', 'ref_logprobs', 'advantages')


def load_prompts(config, template, split: str, workdir: str) -> list[tuple[list[int], str, str]]:
  """(token ids, text, reference) per SFT prompt of at most ppo.max_prompt_len tokens: the turns
  before the last assistant reply + the assistant marker, the last user turn, and that reply."""
  out = []
  for src in sources.build_all(config.data, split, workdir):
    if src.format != 'sft':
      raise base_config.ConfigError(f'config.data.sources.{src.name}: RL prompts come from sft '
                                    f'sources, this one is {src.format!r}')
    for item in src.items:
      messages = item[1]
      last = max(i for i, m in enumerate(messages) if m['role'] == 'assistant')
      ids, _ = template.encode(messages[:last], generation_prompt=True)
      if len(ids) <= config.ppo.max_prompt_len:
        user = next((m['content'] for m in messages[last::-1] if m['role'] == 'user'), '')
        out.append(([int(x) for x in ids], user, messages[last]['content']))
  if not out:
    raise base_config.ConfigError(f'no {split} prompt fits ppo.max_prompt_len='
                                  f'{config.ppo.max_prompt_len}')
  return out


def advantages(rollout: dict, scores_b, kl_coef, p) -> dict:
  kl_bt = ppo.kl_penalty(rollout['logprobs'], rollout['ref_logprobs'], p.kl_estimator)
  mask = rollout['mask']
  rewards_bt = ppo.shaped_rewards(scores_b, kl_bt, mask, kl_coef)
  if p.whiten_rewards:
    rewards_bt = ppo.whiten(rewards_bt, mask, shift_mean=False)
  adv_bt, returns_bt = ppo.gae(rewards_bt, rollout['values'], mask, p.gamma, p.lam)
  return {'advantages': ppo.whiten(adv_bt, mask), 'returns': returns_bt,
          'kl_sum_b': jnp.sum(kl_bt * mask, axis=1)}


def update_loss(trained, micro, rng, *, mdef, critic_mdef, loss_cfg, kl=None):
  """train/step.py's loss_fn of a PPO update of {'params': policy, 'critic'}, or of a GRPO update of
  the policy params (critic_mdef None; `kl`: (kl_coef, estimator))."""
  rows = (micro['tokens'], micro['positions'], micro['segment_ids'])
  logits, aux = mdef.build(trained if critic_mdef is None else trained['params'])(*rows)
  logp_bt, entropy_bt = ppo.token_logprobs_and_entropy(logits, micro['tokens'])
  if critic_mdef is None:
    loss, metrics = ppo.grpo_losses(logp_bt, entropy_bt, micro, micro['mask'], loss_cfg, *kl)
  else:
    values_bt = critic_mdef.build(trained['critic'])(*rows)[0][:, :-1]
    loss, metrics = ppo.ppo_losses(logp_bt, entropy_bt, values_bt, micro, micro['mask'], loss_cfg)
  count = jnp.sum(micro['mask'])
  total = (loss + aux.get('aux_loss', 0.0)) * count
  return total, (count, {k: v * count for k, v in dict(metrics, loss=loss).items()})


def optimizers(config, num_updates: int):
  """({'params', 'critic'}: optimiser, same keys: schedule); the critic's peak is ppo.critic_lr.
  The policy's learning rate is 0 over the updates of the first ppo.critic_warmup iterations."""
  p = config.ppo
  optims = {'params': config.optim, 'critic': ml_collections.ConfigDict(
      dict(config.optim.to_dict(), peak_lr=p.critic_lr))}
  delay = {'params': p.critic_warmup * p.ppo_epochs * p.num_minibatches, 'critic': 0}
  return ({k: optimizer_lib.make(o, num_updates, delay[k]) for k, o in optims.items()},
          {k: optimizer_lib.schedule(o, num_updates, delay[k]) for k, o in optims.items()})


def grad_norms(grads) -> dict:
  return {'policy/grad_norm': optax.tree.norm(grads['params']),
          'val/grad_norm': optax.tree.norm(grads['critic'])}


def stage(config) -> stage_lib.Stage:
  """The PPO or GRPO stage of `config` (a stage config with data.tokenizer filled in)."""
  t, p = config.train, config.ppo
  steps = pt_config.ppo_updates(config)
  loss_cfg = ppo.LossConfig(p.cliprange, p.cliprange_value, p.vf_coef, p.ent_coef)
  updates = dict(
      name=config.stage, steps=steps, validate=pt_config.validate, eval_batches=0,
      step_tokens=pt_config.rollouts_per_iteration(config) // p.num_minibatches * (
          p.max_prompt_len + p.max_new_tokens),
      before_step=lambda data, state, step: data.refill(state),
      evaluate=lambda data, params, frozen: {'eval/score_before': data.score_before,
                                             'eval/score': data.mean_score(params)},
      save_every=p.ppo_epochs * p.num_minibatches,
      replicate_batch=True)  # A minibatch need not divide over the batch shards.
  if config.stage == 'grpo':
    reward_fn = rewards.make(config.grpo.reward)
    return stage_lib.Stage(
        make_data=lambda ctx, split: Rollouts(config, ctx, None, reward_fn),
        make_loss=lambda mdef, frozen: functools.partial(
            update_loss, mdef=mdef, critic_mdef=None, loss_cfg=loss_cfg,
            kl=(p.kl_coef, p.kl_estimator)),
        init_state=lambda ctx, mdef, state: dict(
            state, params=workdir_lib.restore_params(t.init_from, ctx.cfg, ctx)),
        shown=GRPO_SHOWN, **updates)
  reward_fn = rewards.make(p.reward, 'ppo.reward') if p.reward else None
  critic_cfg = (reward.run_model_config(p.reward_model) if p.critic_init == 'reward_model'
                else base_config.model_config(config))
  critic_mdef, _ = state_lib.model_def(critic_cfg, ScalarModel)
  txs, schedules = optimizers(config, steps)
  tx = step_lib.per_key(txs)

  def make_state(ctx, steps):  # Each model's state as train/state.py makes it, then merged.
    policy, policy_shardings, mdef = state_lib.create(ctx.cfg, txs['params'], ctx.mesh, t.seed)
    critic, critic_shardings, _ = state_lib.create(critic_cfg, txs['critic'], ctx.mesh,
                                                   t.seed + 1, ScalarModel)
    merge = lambda p, c: dict(p, critic=c['params'],
                              opt_state={'params': p['opt_state'], 'critic': c['opt_state']})
    return (merge(policy, critic), merge(policy_shardings, critic_shardings), mdef, tx,
            schedules['params'])

  def init_state(ctx, mdef, state):
    critic = (workdir_lib.restore_params(p.reward_model, critic_cfg, ctx, ScalarModel)
              if p.critic_init == 'reward_model'
              else reward.trunk_and_head(t.init_from, ctx.cfg, ctx, state['critic']))
    return dict(state, params=workdir_lib.restore_params(t.init_from, ctx.cfg, ctx), critic=critic)

  return stage_lib.Stage(
      make_data=lambda ctx, split: Rollouts(config, ctx, critic_mdef, reward_fn),
      make_loss=lambda mdef, frozen: functools.partial(
          update_loss, mdef=mdef, critic_mdef=critic_mdef, loss_cfg=loss_cfg),
      init_state=init_state, shown=SHOWN, make_state=make_state,
      step_options={'trained': ('params', 'critic'), 'grad_metrics': grad_norms}, **updates)


def keep_groups(spread_rk: list, b: int) -> list[tuple[int, int]]:
  """The `b` groups of an iteration, (round, group) in order, from each round's [b] bools (True:
  its rewards differ): every group with a spread, by round, topped up with the others, by round."""
  ranked = sorted((not spread, r, k) for r, spread_k in enumerate(spread_rk)
                  for k, spread in enumerate(spread_k))
  return sorted((r, k) for _, r, k in ranked[:b])


class Rollouts:
  """The RL stages' data: `refill(state)`, on an empty queue, samples and scores an iteration's
  rollouts with state's policy (and PPO's critic) and queues ppo_epochs x num_minibatches shuffled
  minibatches ({ROLLOUT_KEYS or GRPO_KEYS: numpy [rollouts / num_minibatches, ...]}) for next().
  `reward_fn`: a rewards.py function of texts (GRPO; PPO with ppo.reward), else the reward model
  scores. get_state() is whole between iterations."""

  def __init__(self, config, ctx, critic_mdef, reward_fn=None):
    t, p = config.train, config.ppo
    self.config, self.tokenizer = config, (tok := Tokenizer(config.data.tokenizer))
    template = chat_lib.ChatTemplate(tok)
    self.prompts = load_prompts(config, template, 'train', ctx.workdir)
    self.eval_prompts = load_prompts(config, template, 'eval', ctx.workdir)[:p.eval_prompts]
    self.order = np.random.default_rng(t.seed).permutation(len(self.prompts))
    self.grpo = config.stage == 'grpo'
    self.group = int(config.grpo.num_generations) if self.grpo else 1
    mdef = state_lib.model_def(ctx.cfg)[0]
    self.logp = jax.jit(lambda params, *rows: ppo.token_logprobs_and_entropy(
        mdef.build(params)(*rows)[0], rows[0]))
    self.generator = gen_lib.Generator(
        ctx.cfg, None, tok, ctx.mesh, ctx.rules,
        max_batch=p.rollout_slots or pt_config.rollouts_per_iteration(config))
    if not self.grpo:
      self.values = jax.jit(lambda params, *rows: critic_mdef.build(params)(*rows)[0][:, :-1])
      self.advantages = jax.jit(lambda r, s, c: advantages(r, s, c, p))
    self.ref_params = workdir_lib.restore_params(t.init_from, ctx.cfg, ctx)
    self.ref_shardings = jax.tree.map(lambda x: x.sharding, self.ref_params)
    if reward_fn is not None:
      self.scores = lambda out, prompts: np.asarray([reward_fn(text, tok.decode(
          out.completion_ids(j)), ref) for j, (_, text, ref) in enumerate(prompts)], np.float32)
    else:
      scorers = [reward.RewardScorer(d, tok, ctx) for d in pt_config.reward_models(config)]
      rm_scores = scorers[0] if len(scorers) == 1 else reward.ensemble(
          scorers, self.complete(self.ref_params, self.eval_prompts, seed=0,
                                 sampling=decode.Sampling()), p.ensemble_combine)
      self.scores = lambda out, prompts: rm_scores(out)
    if p.ref_on_host:
      self.ref_params = jax.device_put(self.ref_params, jax.tree.map(
          lambda s: s.with_memory_kind('pinned_host'), self.ref_shardings))
    self.kl = ppo.AdaptiveKL(p.kl_coef, p.kl_target if p.adaptive_kl else None, p.kl_horizon)
    self.iteration, self.cursor, self.score_before, self.queue = 0, 0, None, []

  def __next__(self) -> dict:
    return self.queue.pop(0)

  def get_state(self) -> dict:
    return {'iteration': self.iteration, 'cursor': self.cursor, 'kl_coef': self.kl.value,
            'score_before': self.score_before}

  def set_state(self, state: dict):
    self.iteration, self.kl.value = state['iteration'], state['kl_coef']
    self.score_before, self.queue = state['score_before'], []
    # Runs saved before grpo.sampling_rounds took prompts train.global_batch an iteration.
    self.cursor = state.get('cursor', self.iteration * self.config.train.global_batch)

  def counts(self) -> dict:
    return {}

  def complete(self, policy, prompts, *, seed, sampling, samples=1) -> gen_lib.Rollout:
    """`samples` completions of each of `prompts` (load_prompts tuples; rows prompt-major)."""
    return self.generator.generate_ids(
        [ids for ids, _, _ in prompts], samples=samples, sampling=sampling, seed=seed,
        max_new_tokens=self.config.ppo.max_new_tokens, stop_ids=self.generator.stop_ids(True),
        params=policy)

  def sample(self, policy, prompts, *, seed, sampling, samples=1):
    """`samples` completions of each of `prompts` (load_prompts tuples; rows prompt-major) and
    their scores: (gen_lib.Rollout, numpy [rows])."""
    p = self.config.ppo
    out = self.complete(policy, prompts, seed=seed, sampling=sampling, samples=samples)
    truncated = np.asarray([f == 'length' for f in out.finish_b])
    scores = self.scores(out, [q for q in prompts for _ in range(samples)])
    return out, scores - p.missing_eos_penalty * truncated

  def forward(self, policy, out) -> tuple[dict, dict]:
    """The rows of Rollout `out` for the updates ({tokens, positions, segment_ids, mask,
    logprobs, ref_logprobs}: numpy [b, t]) and their metrics."""
    lay = out.layout()
    args = (lay['tokens'], lay['positions'], lay['segment_ids'])
    logprobs, entropy = self.logp(policy, *args)
    ref_logprobs, _ = self.logp(jax.device_put(self.ref_params, self.ref_shardings), *args)
    mask = lay['response_mask'][:, 1:]
    batch = dict(zip(('tokens', 'positions', 'segment_ids'), args), mask=mask,
                 logprobs=np.asarray(logprobs), ref_logprobs=np.asarray(ref_logprobs))
    metrics = {'objective/entropy': float(np.sum(np.asarray(entropy) * mask) / max(mask.sum(), 1)),
               'completions/mean_length': float(out.num_new_b.mean()),
               'completions/truncated_fraction': float(np.mean([f == 'length'
                                                                for f in out.finish_b]))}
    return batch, metrics

  def mean_score(self, policy) -> float:
    """Mean reward of greedy completions of the held-out prompts."""
    _, scores = self.sample(policy, self.eval_prompts, seed=0, sampling=decode.Sampling())
    return float(scores.mean())

  def sample_groups(self, policy, sampling) -> tuple[gen_lib.Rollout, np.ndarray, dict]:
    """An iteration's train.global_batch prompts x group samples and their scores, from the next
    prompts in order. With grpo.sampling_rounds > 1, groups whose scores all agree are replaced by
    those of further rounds of prompts while rounds remain (DAPO's dynamic sampling)."""
    t, b, g = self.config.train, self.config.train.global_batch, self.group
    rounds = int(self.config.grpo.sampling_rounds) if self.grpo else 1
    outs, scores, spread = [], [], []
    for r in range(rounds):
      pick = [self.order[(self.cursor + j) % len(self.order)] for j in range(b)]
      self.cursor += b
      seed = t.seed * 1_000_003 + self.iteration if r == 0 else int(
          np.random.SeedSequence([t.seed, self.iteration, r]).generate_state(1)[0] >> 1)
      out, scores_r = self.sample(policy, [self.prompts[i] for i in pick], samples=g,
                                  seed=seed, sampling=sampling)
      outs.append(out)
      scores.append(scores_r)
      spread.append(scores_r.reshape(b, g).std(axis=1) > 0)
      if sum(s.sum() for s in spread) >= b:
        break
    kept = keep_groups(spread, b)
    rows = lambda r: [k * g + j for rr, k in kept if rr == r for j in range(g)]
    out = gen_lib.concat([o.rows(rows(r)) for r, o in enumerate(outs)], self.tokenizer.pad_id)
    metrics = {'objective/scores': float(np.concatenate(scores).mean())}  # Of every sample.
    if self.grpo:
      metrics.update({'objective/sampling_rounds': float(len(outs)),
                      'objective/zero_std_fraction': float(1 - np.mean(np.concatenate(spread)))})
    return out, np.concatenate([scores[r][rows(r)] for r in range(len(outs))]), metrics

  def refill(self, state) -> dict:
    """The rollout phase of an iteration, if the queue is empty: its metrics (else {})."""
    if self.queue:
      return {}
    t, p = self.config.train, self.config.ppo
    if self.score_before is None:
      self.score_before = self.mean_score(state['params'])
      log.info('%s: mean reward of greedy completions of %d held-out prompts: %.4f',
               self.config.stage, len(self.eval_prompts), self.score_before)
    it, b = self.iteration, t.global_batch
    out, scores, metrics = self.sample_groups(
        state['params'], decode.Sampling(temperature=p.temperature))
    batch, forward_metrics = self.forward(state['params'], out)
    metrics.update(forward_metrics)
    kl_coef, keys = self.kl.value, ROLLOUT_KEYS
    if self.grpo:
      keys, kl_bt = GRPO_KEYS, ppo.kl_penalty(batch['logprobs'], batch['ref_logprobs'],
                                              p.kl_estimator)
      batch['advantages'] = np.asarray(ppo.group_advantages(
          scores, self.group, self.config.grpo.scale_rewards))[:, None] * batch['mask']
      kl = float(np.mean(np.sum(np.asarray(kl_bt) * batch['mask'], axis=1)))
    else:
      batch['values'] = np.asarray(self.values(
          state['critic'], batch['tokens'], batch['positions'], batch['segment_ids']))
      batch.update(jax.tree.map(np.asarray, self.advantages(
          {k: batch[k] for k in ('logprobs', 'ref_logprobs', 'mask', 'values')}, scores, kl_coef)))
      kl = float(batch.pop('kl_sum_b').mean())
      self.kl.update(kl, b)
    score, n = metrics['objective/scores'], len(scores)
    rng = np.random.default_rng([t.seed, it])
    self.queue = [{k: batch[k][mb] for k in keys} for _ in range(p.ppo_epochs)
                  for mb in np.split(rng.permutation(n), p.num_minibatches)]
    self.iteration += 1
    return dict(metrics, **{'objective/kl': kl,
                            'objective/non_score_reward': -kl_coef * kl,
                            'objective/rlhf_reward': score - kl_coef * kl,
                            'objective/kl_coef': kl_coef})
