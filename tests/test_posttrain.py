"""Post-training pieces: SFT masking, reward model reading and loss, PPO invariants, DPO loss."""

import functools
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from data import config as data_config
from data import pipeline
from experiments import dense_65b, dense_65b_rlhf, dense_65b_sft, mixtral_8x7b, mixtral_8x7b_sft
from model.config import ConfigError
from model.heads import ScalarModel, last_index
from train import config as base_config
from train import generate as gen_lib
from train import optimizer as optimizer_lib
from train import step as step_lib
from train import state as state_lib
from train.posttrain import config as pt_config
from train.posttrain import dpo, ppo, ppo_loop, reward, rewards
from tests.util import max_abs_diff, tiny_cfg

VOCAB = 400


@pytest.fixture(scope='module')
def sft_batch(tmp_path_factory):
  cfg = data_config.default_config()
  cfg.update(seq_len=48, tokenizer_docs=300, embedded_docs=300, embedded_examples=64,
             embedded_eval_docs=8, packing='pad', source='embedded_sft')
  it = pipeline.make_iterator(cfg, vocab_size=VOCAB, global_batch=2,
                              workdir=str(tmp_path_factory.mktemp('sft')))
  return next(it), it.tokenizer


def test_sft_gradient_ignores_prompt_targets(sft_batch):
  batch, tok = sft_batch
  mask = batch['loss_mask']
  assert 0 < mask.sum() < (batch['segment_ids'] > 0).sum()  # Prompts are real, not learned.
  # What is learned: replies (answers, "The answer is ...") and their end markers only.
  end = tok.special_id('<|end|>')
  learned = batch['targets'][mask > 0]
  assert np.sum(learned == end) == np.sum((batch['targets'] == end) & (mask > 0))
  assert tok.special_id('<|user|>') not in learned and tok.special_id('<|assistant|>') not in learned
  cfg = tiny_cfg(vocab_size=VOCAB)
  mdef, _ = state_lib.model_def(cfg)
  params = state_lib.init_params(cfg, jax.random.PRNGKey(0))
  grad = jax.jit(jax.grad(lambda p, b: step_lib.lm_loss(mdef)(p, b, None)[0]))
  base = grad(params, batch)
  rng = np.random.default_rng(0)
  prompt_changed = dict(batch, targets=np.where(mask == 0, rng.integers(0, VOCAB, mask.shape),
                                                batch['targets']).astype(np.int32))
  assert max_abs_diff(base, grad(params, prompt_changed)) == 0.0
  reply_changed = dict(batch, targets=np.where(mask > 0, (batch['targets'] + 1) % VOCAB,
                                               batch['targets']).astype(np.int32))
  assert max_abs_diff(base, grad(params, reply_changed)) > 1e-4


def _scalar_model():
  cfg = tiny_cfg()
  return cfg, ScalarModel(cfg, nnx.Rngs(0))


def test_reward_read_at_last_real_token_any_padding():
  cfg, model = _scalar_model()
  ids = np.asarray([5, 9, 14, 3, 77, 20], np.int32)
  n, t = len(ids), 10
  alone = np.asarray(model(ids[None])[0])[0, -1]
  right = np.zeros((1, t), np.int32), np.zeros((1, t), np.int32), np.zeros((1, t), np.int32)
  right[0][0, :n], right[1][0, :n], right[2][0, :n] = ids, np.arange(n), 1
  left = np.full((1, t), 41, np.int32), np.zeros((1, t), np.int32), np.zeros((1, t), np.int32)
  left[0][0, t - n:], left[1][0, t - n:], left[2][0, t - n:] = ids, np.arange(n), 1
  for tokens, pos, seg in (right, left):
    scores, _ = model(tokens, pos, seg)
    r = reward.sequence_rewards(scores, seg)
    np.testing.assert_allclose(np.asarray(r)[0], alone, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(last_index(jnp.asarray([[0, 1, 1, 0], [1, 1, 1, 1],
                                                                    [0, 0, 0, 1]]))), [2, 3, 3])


def test_bt_loss_closed_form_and_metrics():
  rc, rr = jnp.asarray([2.0, -1.0, 0.5]), jnp.asarray([1.0, 0.5, 0.5])
  for margin in (0.0, 0.7):
    want = np.log1p(np.exp(-(np.asarray(rc) - np.asarray(rr) - margin)))
    np.testing.assert_allclose(np.asarray(reward.bt_loss(rc, rr, margin)), want, rtol=1e-6)
  cfg, _ = _scalar_model()
  mdef, _ = state_lib.model_def(cfg, ScalarModel)
  params = state_lib.init_params(cfg, jax.random.PRNGKey(1), ScalarModel)
  rng = np.random.default_rng(0)
  side = lambda: {'inputs': rng.integers(1, 97, (3, 8)).astype(np.int32),
                  'positions': np.broadcast_to(np.arange(8, dtype=np.int32), (3, 8)),
                  'segment_ids': np.ones((3, 8), np.int32)}
  micro = {'chosen': side(), 'rejected': side()}
  total, (count, sums) = reward.loss_fn(params, micro, None, mdef=mdef)
  model = mdef.build(params)
  r_c = np.asarray(model(micro['chosen']['inputs'])[0])[:, -1]
  r_r = np.asarray(model(micro['rejected']['inputs'])[0])[:, -1]
  np.testing.assert_allclose(float(total), np.sum(np.log1p(np.exp(-(r_c - r_r)))), rtol=1e-5)
  assert float(count) == 3
  np.testing.assert_allclose(float(sums['rm/accuracy']), np.sum(r_c > r_r))
  np.testing.assert_allclose(float(sums['rm/margin']), np.sum(r_c - r_r), rtol=1e-5, atol=1e-6)
  assert 'head_dv' not in params['decoder']  # The trunk carries no LM output table.


def test_reward_ensemble_standardises_then_combines():
  """Members standardised on the calibration rollout (mean 0, std 1 there), then mean or min."""
  base = lambda out: np.asarray(out, np.float32)
  calibration = [0.0, 1.0, 2.0, 3.0]  # Mean 1.5, std sqrt(1.25).
  a, b = (lambda out: 10 * base(out) - 4), (lambda out: -base(out) + 7)  # b ranks the other way.
  z = lambda x: (np.asarray(x) - 1.5) / np.sqrt(1.25)
  out = [0.0, 3.0, 5.0]
  same = reward.ensemble([a, lambda out: 2 * base(out) + 1], calibration, 'mean')
  np.testing.assert_allclose(same(out), z(out), rtol=1e-5)  # Scale and offset do not matter.
  np.testing.assert_allclose(reward.ensemble([a, b], calibration, 'mean')(out), 0.0, atol=1e-5)
  np.testing.assert_allclose(reward.ensemble([a, b], calibration, 'min')(out), -np.abs(z(out)),
                             rtol=1e-5)
  assert reward.ensemble([a, b], calibration, 'min')(out).dtype == np.float32


def test_gae_hand_computed():
  # One row: prompt column 0, actions at 1..3 (the episode), padding at 4.
  mask = jnp.asarray([[0.0, 1.0, 1.0, 1.0, 0.0]])
  r = jnp.asarray([[9.0, 0.1, -0.2, 1.5, 9.0]])
  v = jnp.asarray([[9.0, 0.5, 0.4, 0.3, 9.0]])
  g, lam = 0.9, 0.8
  d3 = 1.5 - 0.3  # Last action: no next value.
  d2 = -0.2 + g * 0.3 - 0.4
  d1 = 0.1 + g * 0.4 - 0.5
  a3 = d3
  a2 = d2 + g * lam * a3
  a1 = d1 + g * lam * a2
  adv, ret = ppo.gae(r, v, mask, g, lam)
  np.testing.assert_allclose(np.asarray(adv)[0], [0, a1, a2, a3, 0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(ret)[0], [0, a1 + 0.5, a2 + 0.4, a3 + 0.3, 0], rtol=1e-6)
  # Rewards: -kl_coef * kl per action, the score added at the last one.
  shaped = ppo.shaped_rewards(jnp.asarray([2.0]), jnp.ones((1, 5)), mask, 0.1)
  np.testing.assert_allclose(np.asarray(shaped)[0], [0, -0.1, -0.1, 1.9, 0], rtol=1e-6)


def test_kl_estimators_and_controller():
  logp, ref = jnp.asarray([[-1.0, -2.0]]), jnp.asarray([[-1.5, -1.0]])
  np.testing.assert_allclose(np.asarray(ppo.kl_penalty(logp, ref, 'k1')), [[0.5, -1.0]])
  log_r = np.asarray([-0.5, 1.0])
  np.testing.assert_allclose(np.asarray(ppo.kl_penalty(logp, ref, 'k3'))[0],
                             np.exp(log_r) - 1 - log_r, rtol=1e-6)
  ctl = ppo.AdaptiveKL(0.1, target=6.0, horizon=100)
  assert ctl.update(12.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # Error clipped.
  assert ppo.AdaptiveKL(0.1).update(50.0, 10) == 0.1  # Fixed.


def _rollout(cfg, mdef, params, seed=0):
  rng = np.random.default_rng(seed)
  b, t = 4, 12
  tokens = rng.integers(1, cfg.vocab_size, (b, t)).astype(np.int32)
  seg = np.ones((b, t), np.int32)
  seg[1, :3] = 0  # A left-padded prompt.
  pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
  mask = np.zeros((b, t - 1), np.float32)
  mask[:, 6:] = 1.0
  mask[2, 9:] = 0.0  # A shorter completion.
  logits, _ = mdef.build(params)(tokens, pos, seg)
  logp, _ = ppo.token_logprobs_and_entropy(logits, tokens)
  return {'tokens': tokens, 'positions': pos, 'segment_ids': seg, 'mask': mask,
          'logprobs': np.asarray(logp)}


def test_policy_equal_to_reference_has_zero_kl_and_unit_ratio():
  cfg = tiny_cfg()
  mdef, _ = state_lib.model_def(cfg)
  params = state_lib.init_params(cfg, jax.random.PRNGKey(0))
  roll = _rollout(cfg, mdef, params)
  logits, _ = mdef.build(params)(roll['tokens'], roll['positions'], roll['segment_ids'])
  ref_logp, entropy = ppo.token_logprobs_and_entropy(logits, roll['tokens'])
  for est in ('k1', 'k3'):
    assert float(jnp.max(jnp.abs(ppo.kl_penalty(roll['logprobs'], ref_logp, est)))) == 0.0
  rng = np.random.default_rng(1)
  old = {'logprobs': roll['logprobs'], 'values': rng.normal(size=roll['mask'].shape),
         'advantages': rng.normal(size=roll['mask'].shape),
         'returns': rng.normal(size=roll['mask'].shape)}
  _, m = ppo.ppo_losses(ref_logp, entropy, old['values'], old, roll['mask'], ppo.LossConfig())
  assert float(m['val/ratio']) == 1.0 and float(m['policy/approxkl']) == 0.0
  assert float(m['policy/clipfrac']) == 0.0 and float(m['val/clipfrac']) == 0.0
  np.testing.assert_allclose(float(m['loss/policy']),
                             -np.sum(old['advantages'] * roll['mask']) / roll['mask'].sum(),
                             rtol=1e-5)


def test_zero_advantages_and_value_error_leave_models_unchanged():
  cfg = tiny_cfg()
  mdef, _ = state_lib.model_def(cfg)
  critic_mdef, _ = state_lib.model_def(cfg, ScalarModel)
  policy = state_lib.init_params(cfg, jax.random.PRNGKey(0))
  critic = state_lib.init_params(cfg, jax.random.PRNGKey(1), ScalarModel)
  roll = _rollout(cfg, mdef, policy)
  values = np.asarray(critic_mdef.build(critic)(roll['tokens'], roll['positions'],
                                                roll['segment_ids'])[0])[:, :-1]
  batch = dict(roll, values=values, advantages=np.zeros_like(values), returns=values)
  config = ml_collections.ConfigDict({'optim': dict(peak_lr=1e-2, warmup_steps=0,
                                                    final_lr_frac=0.1, b1=0.9, b2=0.95, eps=1e-8,
                                                    weight_decay=0.0, clip_norm=1.0),
                                      'ppo': {'critic_lr': 1e-2, 'critic_warmup': 0, 'ppo_epochs': 1,
                                              'num_minibatches': 1}})
  txs, schedules = ppo_loop.optimizers(config, 10)
  state = {'step': jnp.int32(0), 'params': policy, 'critic': critic,
           'opt_state': {'params': txs['params'].init(policy), 'critic': txs['critic'].init(critic)},
           'rng': jax.random.PRNGKey(0)}
  loss_fn = functools.partial(ppo_loop.update_loss, mdef=mdef, critic_mdef=critic_mdef,
                              loss_cfg=ppo.LossConfig(ent_coef=0.0))
  step = jax.jit(lambda s, b: step_lib.train_step(
      s, b, None, make_loss=lambda _: loss_fn, tx=step_lib.per_key(txs),
      schedule=schedules['params'], count_name='tokens', use_rng=False,
      trained=('params', 'critic'), grad_metrics=ppo_loop.grad_norms))
  micro = jax.tree.map(lambda x: x[None], batch)
  new, m = step(state, micro)
  assert float(m['policy/grad_norm']) == 0.0 and max_abs_diff(new['params'], policy) == 0.0
  # The values recomputed inside the step agree with `values` only to rounding, so the value
  # gradient is ~0 rather than 0 (and Adam would still take a full-size step on it).
  assert float(m['val/grad_norm']) < 1e-6 and float(m['loss/value']) < 1e-12
  # A non-zero advantage does move the policy (the test above is not vacuous).
  moved, _ = step(state, jax.tree.map(lambda x: x[None],
                                      dict(batch, advantages=np.ones_like(values))))
  assert max_abs_diff(moved['params'], policy) > 1e-4


def test_group_advantages_hand_computed():
  scores = np.asarray([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 3.0], np.float32)
  with pytest.raises(TypeError):  # 10 scores are not groups of 4.
    ppo.group_advantages(scores, 4)
  adv = np.asarray(ppo.group_advantages(scores[:8], 4, scale=False))
  np.testing.assert_allclose(adv, [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
  adv = np.asarray(ppo.group_advantages(scores[:8], 4))  # Group 1: mean 0.5, std 0.5.
  np.testing.assert_allclose(adv, [0.5 / 0.5001, -0.5 / 0.5001, -0.5 / 0.5001, 0.5 / 0.5001,
                                   0, 0, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(ppo.group_advantages(scores[8:], 2)),
                             [-1.5 / 1.5001, 1.5 / 1.5001], rtol=1e-6)


def test_grpo_loss_hand_computed_and_step_moves_towards_reward():
  cfg = tiny_cfg()
  mdef, _ = state_lib.model_def(cfg)
  params = state_lib.init_params(cfg, jax.random.PRNGKey(0))
  roll = _rollout(cfg, mdef, params)
  mask = roll['mask']
  adv_b = np.where(np.arange(mask.shape[0]) % 2 == 0, 1.0, -1.0).astype(np.float32)
  old = dict(roll, advantages=adv_b[:, None] * mask, ref_logprobs=roll['logprobs'] - 0.5)
  logits, _ = mdef.build(params)(roll['tokens'], roll['positions'], roll['segment_ids'])
  logp, entropy = ppo.token_logprobs_and_entropy(logits, roll['tokens'])
  loss, m = ppo.grpo_losses(logp, entropy, old, mask, ppo.LossConfig(), 0.1, 'k3')
  # Ratio 1: the policy loss is -mean A over completion tokens; every token has
  # r = p_ref / p = exp(-0.5), so k3 = (r - 1) - log r.
  k3 = np.expm1(-0.5) + 0.5
  pg = -np.sum(old['advantages']) / mask.sum()
  np.testing.assert_allclose(float(m['loss/kl']), k3, rtol=1e-5)
  np.testing.assert_allclose(float(loss), pg + 0.1 * k3, rtol=1e-5, atol=1e-6)
  # One step raises the log-probs of the positive-advantage completions against the others.
  config = ml_collections.ConfigDict({'optim': dict(peak_lr=1e-2, warmup_steps=0,
                                                    final_lr_frac=0.1, b1=0.9, b2=0.95, eps=1e-8,
                                                    weight_decay=0.0, clip_norm=1.0)})
  tx = optimizer_lib.make(config.optim, 10)
  state = {'step': jnp.int32(0), 'params': params, 'opt_state': tx.init(params),
           'rng': jax.random.PRNGKey(0)}
  loss_fn = functools.partial(ppo_loop.update_loss, mdef=mdef, critic_mdef=None,
                              loss_cfg=ppo.LossConfig(), kl=(0.0, 'k3'))
  batch = {k: old[k] for k in ppo_loop.GRPO_KEYS}
  new, _ = jax.jit(lambda s, b: step_lib.train_step(
      s, b, None, make_loss=lambda _: loss_fn, tx=tx, schedule=optimizer_lib.schedule(
          config.optim, 10)))(state, jax.tree.map(lambda x: x[None], batch))
  logits, _ = mdef.build(new['params'])(roll['tokens'], roll['positions'], roll['segment_ids'])
  gain_b = np.sum((np.asarray(ppo.token_logprobs_and_entropy(logits, roll['tokens'])[0]) -
                   np.asarray(logp)) * mask, axis=1)
  assert gain_b[adv_b > 0].mean() > 0 > gain_b[adv_b < 0].mean()


def test_dynamic_sampling_keeps_groups_with_a_spread_then_tops_up():
  yes, no = True, False
  # Round 0 has two groups with a spread, round 1 three: the batch of 4 takes round 0's two and
  # round 1's first two; groups come back in (round, group) order.
  assert ppo_loop.keep_groups([[yes, no, no, yes], [no, yes, yes, yes]], 4) == [
      (0, 0), (0, 3), (1, 1), (1, 2)]
  # Too few after the last round: topped up with the earliest groups without a spread.
  assert ppo_loop.keep_groups([[no, yes, no], [no, no, yes]], 3) == [(0, 0), (0, 1), (1, 2)]
  # One round (PPO, or GRPO's default): every group, in order.
  assert ppo_loop.keep_groups([[no, yes, no]], 3) == [(0, 0), (0, 1), (0, 2)]


def test_dynamic_sampling_batch_is_the_kept_groups_rows_and_scores():
  """Rollouts.sample_groups on a stub sampler: prompts p1, p4 and p5 have a reward spread; round
  0 (p0-p2, prompt bucket 8) has one, round 1 (p3-p5, bucket 16) two, so it stops there."""
  b, g, spread = 3, 2, {1, 4, 5}
  data = ppo_loop.Rollouts.__new__(ppo_loop.Rollouts)  # Only what sample_groups reads.
  data.config = ml_collections.ConfigDict({'train': {'seed': 0, 'global_batch': b},
                                           'grpo': {'sampling_rounds': 4}})
  data.group, data.grpo, data.iteration, data.cursor = g, True, 0, 0
  data.prompts = [([i], f'p{i}', '') for i in range(9)]
  data.order = np.arange(9)
  data.tokenizer = types.SimpleNamespace(pad_id=0)

  def sample(policy, prompts, *, seed, sampling, samples):
    p = 8 if prompts[0][0][0] < 3 else 16
    tokens = np.zeros((len(prompts) * samples, p + 4), np.int32)
    tokens[:, p - 1] = np.repeat([100 + q[0][0] for q in prompts], samples)  # Last prompt token.
    tokens[:, p] = np.tile(np.arange(samples), len(prompts)) + 1  # The sample's index + 1.
    scores = np.asarray([float(q[0][0] in spread and j == 0) for q in prompts
                         for j in range(samples)], np.float32)
    n = len(tokens)
    return gen_lib.Rollout(tokens, np.zeros(tokens.shape, np.float32), np.ones(n, np.int32),
                           np.ones(n, np.int32), p, ['eos'] * n), scores
  data.sample = sample
  out, scores, metrics = data.sample_groups(None, None)
  assert out.prompt_len == 16 and data.cursor == 2 * b
  np.testing.assert_array_equal(out.tokens_bs[:, 15], [101, 101, 104, 104, 105, 105])
  np.testing.assert_array_equal(out.tokens_bs[:, 16], [1, 2] * 3)
  np.testing.assert_array_equal(scores, [1, 0] * 3)  # Each row's own score.
  assert metrics == {'objective/scores': 3 / 12, 'objective/sampling_rounds': 2.0,
                     'objective/zero_std_fraction': 0.5}


def test_verifiable_rewards_and_bad_specs():
  assert rewards.embedded('q', ' The answer is 12. ', 'The answer is 12.') == 1.0
  assert rewards.embedded('q', '12', '12') == 1.0
  assert rewards.embedded('q', 'The answer is 13.', '12') == 0.0
  assert rewards.gsm8k_reward('q', 'so 3 + 4 = 7. #### 7', 'work <<3+4=7>> #### 7') == 1.0
  assert rewards.gsm8k_reward('q', 'I think 1,000', 'x #### 1000') == 1.0
  assert rewards.gsm8k_reward('q', 'no number', 'x #### 5') == 0.0
  assert rewards.make('tests.test_posttrain:_length_reward')('', 'abc', '') == 3.0
  for spec, match in (('nope', 'module:function'), ('no_such_module:f', 'no_such_module'),
                      ('tests.test_posttrain:missing', 'missing')):
    with pytest.raises(ConfigError, match=f'grpo.reward=.*{match}'):
      rewards.make(spec)


def _length_reward(prompt, reply, reference):
  return float(len(reply))


def test_grpo_config_checks(tmp_path):
  c = pt_config.defaults()
  c.stage, c.train.init_from, c.train.global_batch = 'grpo', str(tmp_path), 8
  c.data.packing = 'pad'
  c.grpo.num_generations = 3
  c.ppo.num_minibatches = 16
  with pytest.raises(ConfigError, match='must divide the 24 rollouts'):
    pt_config.validate(c, 8)
  c.ppo.num_minibatches, c.train.ckpt_every = 3, 12
  assert pt_config.rollouts_per_iteration(c) == 24
  pt_config.validate(c, 8)  # No reward model needed.
  c.grpo.num_generations = 1
  with pytest.raises(ConfigError, match='grpo.num_generations=1'):
    pt_config.validate(c, 8)
  c.grpo.num_generations, c.grpo.sampling_rounds = 3, 0
  with pytest.raises(ConfigError, match='grpo.sampling_rounds=0 must be >= 1'):
    pt_config.validate(c, 8)
  c.stage, c.dpo.nll_weight = 'dpo', -1.0
  with pytest.raises(ConfigError, match='dpo.nll_weight=-1.0 must be >= 0'):
    pt_config.validate(c, 8)


def test_dpo_loss_hand_computed_and_vanishing_beta():
  loss, c, r = dpo.dpo_loss(jnp.asarray(-1.0), jnp.asarray(-3.0), jnp.asarray(-2.0),
                            jnp.asarray(-2.0), 0.5)
  # beta * ((pi_c - ref_c) - (pi_r - ref_r)) = 0.5 * (1 - (-1)) = 1: loss = log(1 + e^-1).
  np.testing.assert_allclose(float(loss), np.log1p(np.exp(-1.0)), rtol=1e-6)
  assert float(c) == 0.5 and float(r) == -0.5
  cfg = tiny_cfg()
  mdef, _ = state_lib.model_def(cfg)
  ref = state_lib.init_params(cfg, jax.random.PRNGKey(0))
  params = state_lib.init_params(cfg, jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)

  def side():
    mask = np.zeros((2, 10), np.float32)
    mask[:, 5:] = 1
    return {'inputs': rng.integers(1, 97, (2, 10)).astype(np.int32),
            'targets': rng.integers(1, 97, (2, 10)).astype(np.int32),
            'positions': np.broadcast_to(np.arange(10, dtype=np.int32), (2, 10)),
            'segment_ids': np.ones((2, 10), np.int32), 'loss_mask': mask}

  micro = {'chosen': side(), 'rejected': side()}
  ref_c, ref_r, _ = dpo.pair_logps(mdef.build(ref), micro)
  pre = dict(micro, ref_chosen=ref_c, ref_rejected=ref_r)
  # Pre-computed reference log-probs give the same loss and metrics as the reference model.
  loss = jax.jit(lambda p, m, r: dpo.loss_fn(p, m, r, mdef=mdef, beta=1.0))
  assert max_abs_diff(loss(params, micro, ref), loss(params, pre, None)) < 1e-5
  # RPO adds nll_weight x the chosen reply's NLL per learned token (5 of each row's 10).
  pi_c = dpo.pair_logps(mdef.build(params), micro)[0]
  rpo, (_, sums) = dpo.loss_fn(params, pre, None, mdef=mdef, beta=1.0, nll_weight=0.3)
  np.testing.assert_allclose(float(sums['nll/chosen']), float(jnp.sum(-pi_c / 5)), rtol=1e-5)
  np.testing.assert_allclose(float(rpo - loss(params, pre, None)[0]),
                             0.3 * float(sums['nll/chosen']), rtol=1e-4)
  norm = lambda g: float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g))))
  # d/dparams sum_i -log sigmoid(beta * D_i) = -beta * sum_i sigmoid(-beta D_i) grad D_i, which
  # tends to -beta/2 * grad sum_i D_i (D = pi_c - pi_r, the reference is constant): it vanishes
  # linearly with beta.
  grad = jax.jit(jax.grad(lambda p, beta: dpo.loss_fn(p, pre, None, mdef=mdef, beta=beta)[0]))

  @jax.jit
  def delta_grad(p):
    return jax.grad(lambda q: jnp.sum(jnp.subtract(*dpo.pair_logps(mdef.build(q), micro)[:2])))(p)

  n_delta = norm(delta_grad(params))
  assert n_delta > 1.0
  for beta in (1e-4, 1e-7):
    np.testing.assert_allclose(norm(grad(params, beta)), 0.5 * beta * n_delta, rtol=1e-3)


def test_large_posttrain_configs_state_their_numbers():
  sft = dense_65b_sft.get_config()
  # 1.5B tokens at 16,384 x 2,048 tokens per step: 45 steps, 1 epoch; warm-up 4.8% of it.
  assert sft.train.steps == 45 and 44 * 16_384 * 2048 < 1.5e9 <= 45 * 16_384 * 2048
  assert sft.optim.warmup_steps == 2 and sft.optim.peak_lr == 2e-5
  assert (sft.train.global_batch, sft.train.grad_accum) == (4 * 16 * 256, 16)
  assert sft.model == dense_65b.get_config().model
  mix, pre = mixtral_8x7b_sft.get_config(), mixtral_8x7b.get_config()
  assert mix.model == pre.model and mix.mesh == pre.mesh
  assert mix.optim.peak_lr < pre.optim.peak_lr / 10
  assert mix.train.steps * mix.train.global_batch * mix.data.seq_len >= 1.5e9
  ppo_cfg = dense_65b_rlhf.get_config('ppo')
  assert ppo_cfg.model == dense_65b.get_config().model
  assert pt_config.ppo_updates(ppo_cfg) == 500 * 2 * 8 and ppo_cfg.optim.warmup_steps == 160
  assert ppo_cfg.ppo.ref_on_host and ppo_cfg.ppo.kl_coef == 0.02


def test_large_posttrain_configs_validate():
  for module, devices in ((dense_65b_sft, 256), (mixtral_8x7b_sft, 512)):
    c = module.get_config()
    with pytest.raises(ConfigError, match='data.sources.sft.path'):  # Given on the command line.
      base_config.validate(c, devices)
    c.data.sources.sft.path = 'gs://bucket/sft/*.jsonl'
    base_config.validate(c, devices)
  for stage, source in (('rm', 'pairs'), ('ppo', 'sft')):
    c = dense_65b_rlhf.get_config(stage)
    c.train.init_from = 'gs://bucket/sft'
    c.ppo.reward_model = 'gs://bucket/rm'
    c.data.sources[source].path = f'gs://bucket/{source}/*.jsonl'
    pt_config.validate(c, 256)
