"""Reward model: the decoder with a scalar head (model/heads.py), trained on preference pairs.

Loss (Bradley-Terry): -log sigmoid(r_chosen - r_rejected - margin), margin = rm.margin (0 is
the plain BT likelihood). A sequence's reward is the head's output at its last real token
(`model.heads.last_index` of segment_ids > 0), so left, right or no padding give the same
reward. Metrics: `loss`, `rm/accuracy` (share of pairs with r_chosen > r_rejected), `rm/margin`
(mean r_chosen - r_rejected), `rm/chosen`, `rm/rejected` (mean rewards); `eval/...` the same on
held-out pairs.

    python -m train.posttrain --config experiments/tiny_rm.py --workdir DIR \\
        --config.train.init_from=SFT_WORKDIR
"""

import functools

import jax
import jax.numpy as jnp

from model.heads import ScalarModel, at_index, last_index
from train.posttrain import pairs, setup


def sequence_rewards(scores_bt, segment_ids_bt):
  """float32 [b]: the score at each row's last real (segment id > 0) token."""
  return at_index(scores_bt, last_index(segment_ids_bt > 0))


def bt_loss(r_chosen_b, r_rejected_b, margin=0.0):
  """Per-pair -log sigmoid(r_chosen - r_rejected - margin)."""
  return -jax.nn.log_sigmoid(r_chosen_b - r_rejected_b - margin)


def rewards(model, rows: dict, rng=None):
  """(float32 [b] rewards, aux) of rows {'inputs', 'positions', 'segment_ids'}."""
  scores_bt, aux = model(rows['inputs'], rows['positions'], rows['segment_ids'], rng)
  return sequence_rewards(scores_bt, rows['segment_ids']), aux


def loss_fn(params, micro, rng=None, *, mdef, margin=0.0):
  """Summed BT loss of a micro-batch of pairs, chosen and rejected in one forward pass:
  (loss_sum, (pair_count, metric_sums)), the loss_fn of train/step.py."""
  del rng
  model = mdef.build(params)
  m = micro['chosen']['inputs'].shape[0]
  both = {k: jnp.concatenate([micro['chosen'][k], micro['rejected'][k]])
          for k in ('inputs', 'positions', 'segment_ids')}
  r_b, aux = rewards(model, both)
  r_chosen, r_rejected = r_b[:m], r_b[m:]
  losses = bt_loss(r_chosen, r_rejected, margin)
  total = jnp.sum(losses) + aux.get('aux_loss', 0.0) * m
  sums = {'loss': jnp.sum(losses), 'rm/accuracy': jnp.sum((r_chosen > r_rejected).astype(jnp.float32)),
          'rm/margin': jnp.sum(r_chosen - r_rejected), 'rm/chosen': jnp.sum(r_chosen),
          'rm/rejected': jnp.sum(r_rejected)}
  return total, (jnp.float32(m), sums)


def stage(config):
  """The reward-model stage: the trunk from `train.init_from` (the SFT model), a fresh head."""
  margin = float(config.rm.margin)

  def init_state(ctx, mdef, state):
    return dict(state, params=setup.trunk_and_head(config.train.init_from, ctx.cfg, ctx,
                                                   state['params']))

  return pairs.stage(
      config, name='rm', model_cls=ScalarModel, init_state=init_state,
      make_loss=lambda mdef, frozen: functools.partial(loss_fn, mdef=mdef, margin=margin),
      shown=('rm/accuracy', 'rm/margin', 'rm/chosen', 'rm/rejected'))
