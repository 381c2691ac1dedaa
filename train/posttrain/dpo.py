"""DPO: the offline alternative to PPO, straight from preference pairs (Rafailov et al. 2023).

With log-probs summed over each reply's learned tokens (the assistant mask of data/chat.py:
the reply and its <|end|>), pi for the policy and ref for the frozen reference (the SFT model):

  loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

Implicit rewards beta * (pi - ref) give the metrics `rewards/chosen`, `rewards/rejected`,
`rewards/accuracy` (share of pairs with chosen > rejected), `rewards/margin` (mean chosen -
rejected); `logps/chosen`, `logps/rejected` are the policy's summed log-probs.

The reference is a second copy of the SFT params sharded like the policy. With
`dpo.precompute_ref`, the run first computes the reference log-probs of every batch it will
train on (and of the eval batches), then frees the reference, so training holds one model.

    python -m train.posttrain --config experiments/tiny_dpo.py --workdir DIR \\
        --config.train.init_from=SFT_WORKDIR
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np

from model.transformer import Decoder
from train.posttrain import pairs, setup

log = logging.getLogger('meshlm')


def sequence_logps(logits_btv, targets_bt, mask_bt):
  """float32 [b]: sum over t of mask * log p(target | prefix)."""
  logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
  token_bt = jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0]
  return jnp.sum(token_bt * mask_bt, axis=-1)


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):
  """Per-pair DPO loss and the implicit rewards (chosen, rejected)."""
  chosen = beta * (pi_chosen - ref_chosen)
  rejected = beta * (pi_rejected - ref_rejected)
  return -jax.nn.log_sigmoid(chosen - rejected), chosen, rejected


def pair_logps(model, micro):
  """(chosen [m], rejected [m], aux): summed reply log-probs, both sides in one forward."""
  m = micro['chosen']['inputs'].shape[0]
  both = {k: jnp.concatenate([micro['chosen'][k], micro['rejected'][k]]) for k in pairs.FIELDS}
  logits_btv, aux = model(both['inputs'], both['positions'], both['segment_ids'])
  logps = sequence_logps(logits_btv, both['targets'], both['loss_mask'])
  return logps[:m], logps[m:], aux


def loss_fn(params, micro, ref_params, *, mdef, beta):
  """Summed DPO loss of a micro-batch; the reference log-probs come from `micro`
  ('ref_chosen', 'ref_rejected', pre-computed) or from `ref_params`."""
  pi_c, pi_r, aux = pair_logps(mdef.build(params), micro)
  if 'ref_chosen' in micro:
    ref_c, ref_r = micro['ref_chosen'], micro['ref_rejected']
  else:
    ref_c, ref_r, _ = pair_logps(mdef.build(ref_params), micro)
  ref_c, ref_r = jax.lax.stop_gradient(ref_c), jax.lax.stop_gradient(ref_r)
  losses, chosen, rejected = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)
  m = pi_c.shape[0]
  sums = {'loss': jnp.sum(losses), 'rewards/chosen': jnp.sum(chosen),
          'rewards/rejected': jnp.sum(rejected),
          'rewards/accuracy': jnp.sum((chosen > rejected).astype(jnp.float32)),
          'rewards/margin': jnp.sum(chosen - rejected), 'logps/chosen': jnp.sum(pi_c),
          'logps/rejected': jnp.sum(pi_r)}
  return jnp.sum(losses) + aux.get('aux_loss', 0.0) * m, (jnp.float32(m), sums)


def _reference_logps(env, mdef, ref_params, data, num_batches):
  """[(ref_chosen [B], ref_rejected [B]) numpy] of the next `num_batches` batches of `data`."""
  fn = jax.jit(lambda p, micro: pair_logps(mdef.build(p), jax.tree.map(lambda x: x[0], micro))[:2])
  out = []
  for _ in range(num_batches):
    c, r = fn(ref_params, pairs.device_pairs(pairs._select(next(data)), 1, env))
    out.append((np.asarray(c), np.asarray(r)))
  return out


def stage(config) -> pairs.PairStage:
  beta = float(config.dpo.beta)
  reference = config.dpo.reference or config.train.init_from

  def init_params(env, cfg, state):
    return setup.restore_lm(config.train.init_from, cfg, env)

  def prepare(env, cfg, train_data, make_data, steps):
    from train import state as state_lib
    ref_params = setup.restore_lm(reference, cfg, env)
    if not config.dpo.precompute_ref:
      return ref_params, None, None
    mdef, _ = state_lib.model_def(cfg, Decoder)
    position = train_data.get_state()
    train_refs = _reference_logps(env, mdef, ref_params, train_data, steps)
    train_data.set_state(position)  # Training replays exactly these batches.
    eval_refs = _reference_logps(env, mdef, ref_params, make_data('eval'),
                                 int(config.dpo.eval_batches))
    del ref_params
    log.info('dpo: reference log-probs of %d training and %d eval batches computed; reference '
             'freed', steps, len(eval_refs))
    fields = lambda refs: lambda k: {'ref_chosen': refs[k][0], 'ref_rejected': refs[k][1]}
    return None, fields(train_refs), fields(eval_refs)

  return pairs.PairStage(
      name='dpo', model_cls=Decoder,
      loss_fn=lambda p, micro, e, mdef: loss_fn(p, micro, e, mdef=mdef, beta=beta),
      init_params=init_params, prepare=prepare,
      shown=('rewards/accuracy', 'rewards/margin', 'rewards/chosen', 'rewards/rejected'))


def run(config, workdir: str) -> pairs.Result:
  return pairs.run(config, workdir, stage(config))
