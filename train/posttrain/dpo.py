"""DPO: the offline alternative to PPO, straight from preference pairs (Rafailov et al. 2023).

With log-probs summed over each reply's learned tokens (the assistant mask of data/chat.py),
pi for the policy and ref for the frozen reference (the SFT model):

  loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) - nll_weight * pi_c / n_c

with n_c the chosen reply's learned tokens: the second term (RPO, Pang et al. 2024; 0 = plain DPO)
is its NLL per token, which keeps the chosen replies' likelihood from falling as the margin grows.

Metrics (docs/posttrain.md): `rewards/*` are the implicit rewards beta * (pi - ref) (`accuracy`:
share chosen > rejected), `logps/*` the policy's. The reference is sharded like the policy; with
`dpo.precompute_ref` its log-probs of all train and eval batches come first, then it is freed.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np

from train import step as step_lib
from train import workdir as workdir_lib
from train.posttrain import pairs

log = logging.getLogger('meshlm')


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):
  """Per-pair DPO loss and the implicit rewards (chosen, rejected)."""
  chosen = beta * (pi_chosen - ref_chosen)
  rejected = beta * (pi_rejected - ref_rejected)
  return -jax.nn.log_sigmoid(chosen - rejected), chosen, rejected


def pair_logps(model, micro):
  """(chosen [m], rejected [m], aux): summed reply log-probs, both sides in one forward."""
  m, both = pairs.both_sides(micro)
  logits_btv, aux = model(both['inputs'], both['positions'], both['segment_ids'])
  logps = -jnp.sum(step_lib.token_nll(logits_btv, both['targets']) * both['loss_mask'], axis=-1)
  return logps[:m], logps[m:], aux


def loss_fn(params, micro, ref_params, *, mdef, beta, nll_weight=0.0):
  """Summed DPO (+ nll_weight x chosen NLL per token) loss of a micro-batch; the reference
  log-probs come from `micro` ('ref_chosen', 'ref_rejected', pre-computed) or from `ref_params`."""
  pi_c, pi_r, aux = pair_logps(mdef.build(params), micro)
  if 'ref_chosen' in micro:
    ref_c, ref_r = micro['ref_chosen'], micro['ref_rejected']
  else:
    ref_c, ref_r, _ = pair_logps(mdef.build(ref_params), micro)
  ref_c, ref_r = jax.lax.stop_gradient(ref_c), jax.lax.stop_gradient(ref_r)
  losses, chosen, rejected = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)
  nll_c = -pi_c / jnp.maximum(jnp.sum(micro['chosen']['loss_mask'], axis=-1), 1.0)
  losses = losses + nll_weight * nll_c
  m = pi_c.shape[0]
  sums = {'loss': jnp.sum(losses), 'rewards/chosen': jnp.sum(chosen),
          'rewards/rejected': jnp.sum(rejected),
          'rewards/accuracy': jnp.sum((chosen > rejected).astype(jnp.float32)),
          'rewards/margin': jnp.sum(chosen - rejected), 'logps/chosen': jnp.sum(pi_c),
          'logps/rejected': jnp.sum(pi_r), 'nll/chosen': jnp.sum(nll_c)}
  return jnp.sum(losses) + aux.get('aux_loss', 0.0) * m, (jnp.float32(m), sums)


def local_rows(x_b) -> np.ndarray:
  """This process's rows of a batch-sharded [B] array, in order (one copy of each shard)."""
  shards = {s.index[0].start or 0: s.data for s in x_b.addressable_shards}
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def reference_logps(ctx, mdef, ref_params, data, num_batches) -> list[dict]:
  """[{'ref_chosen', 'ref_rejected': numpy [B_local]}] of the next `num_batches` of `data`."""
  fn = jax.jit(lambda p, micro: pair_logps(mdef.build(p), jax.tree.map(lambda x: x[0], micro))[:2],
               out_shardings=ctx.batch_sharding(1))
  out = []
  for _ in range(num_batches):
    c, r = fn(ref_params, step_lib.device_batch(next(data), 1, ctx.batch_sharding))
    out.append({'ref_chosen': local_rows(c), 'ref_rejected': local_rows(r)})
  return out


def with_fields(data, fields: list[dict]):
  """`data` whose k-th batch also holds fields[k]."""
  batches = iter(fields)
  return pairs.Mapped(data, lambda batch: {**batch, **next(batches)})


def stage(config):
  """The DPO stage: the policy from `train.init_from`, the frozen reference from `dpo.reference`."""
  beta, nll_weight = float(config.dpo.beta), float(config.dpo.nll_weight)
  reference = config.dpo.reference or config.train.init_from

  def init_state(ctx, mdef, state):
    return dict(state, params=workdir_lib.restore_params(config.train.init_from, ctx.cfg, ctx))

  def prepare(ctx, mdef, data, make_eval_data, steps_left):
    ref_params = workdir_lib.restore_params(reference, ctx.cfg, ctx)
    if not config.dpo.precompute_ref:
      return ref_params, data, make_eval_data
    position = data.get_state()
    train_refs = reference_logps(ctx, mdef, ref_params, data, steps_left)
    data.set_state(position)  # Training replays exactly these batches.
    eval_refs = reference_logps(ctx, mdef, ref_params, make_eval_data(), int(config.dpo.eval_batches))
    del ref_params
    log.info('dpo: reference log-probs of %d training and %d eval batches computed; reference '
             'freed', steps_left, len(eval_refs))
    return None, with_fields(data, train_refs), lambda: with_fields(make_eval_data(), eval_refs)

  return pairs.stage(
      config, name='dpo', init_state=init_state, prepare=prepare,
      make_loss=lambda mdef, frozen: lambda p, micro, rng: loss_fn(
          p, micro, frozen, mdef=mdef, beta=beta, nll_weight=nll_weight),
      shown=('rewards/accuracy', 'rewards/margin', 'rewards/chosen', 'rewards/rejected'))
