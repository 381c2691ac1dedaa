"""The jitted train and eval steps.

A batch holds `grad_accum` micro-batches stacked on a leading axis: every array is
[accum, micro_batch, length]. The step scans over them summing token losses and gradients,
then divides by the total count of target tokens of the whole batch, so 1 x 8 and 8 x 1 give
the same update (not a mean of per-micro-batch means).
"""

import functools

import jax
import jax.numpy as jnp
import optax

from model.sharding import constrain
from train.head_loss import head_nll_sum


def token_nll(logits_btv, targets_bt):
  """Per-token negative log-likelihood in float32 (eval-style and reference use; the train step
  fuses the head and this loss in train/head_loss.py)."""
  logits_btv = logits_btv.astype(jnp.float32)
  logz_bt = jax.nn.logsumexp(logits_btv, axis=-1)
  target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
  return logz_bt - target_logit_bt


def loss_sums(params, batch, rng, mdef):
  """(loss_sum to differentiate, (nll_sum, token_count, aux)) for one micro-batch."""
  model = mdef.build(params)
  h_btd, aux = model.hidden(batch['inputs'], batch['positions'], batch['segment_ids'], rng)
  mask_bt = batch['loss_mask'].astype(jnp.float32)
  # The head and the loss fused, chunked over the sequence (train/head_loss.py): equal to
  # sum(token_nll(model.logits(h_btd), targets) * mask) without [b, t, vocab] arrays.
  nll_sum = head_nll_sum(h_btd, model.head_matrix(), batch['targets'], mask_bt)
  count = jnp.sum(mask_bt)
  # The aux loss is a per-micro-batch mean; weighting it by the token count makes the final
  # division by the total count a token-weighted mean over micro-batches.
  total = nll_sum + aux.get('aux_loss', 0.0) * count
  return total, (nll_sum, count, aux)


def accumulate_grads(params, batch, rng, mdef):
  """Sums of gradients, losses and counts over the micro-batches (leading axis of `batch`)."""
  grad_fn = jax.grad(loss_sums, has_aux=True)
  num_micro = batch['inputs'].shape[0]

  def micro_grads(micro, i):
    micro = {k: constrain(v, ('batch', 'length')) for k, v in micro.items()}
    micro_rng = None if rng is None else jax.random.fold_in(rng, i)
    return grad_fn(params, micro, micro_rng, mdef)

  if num_micro == 1:
    # No scan and no zero-initialised gradient sums to add into: one pass over the parameters
    # fewer (for Mixtral-style MoE, whose parameters are mostly idle experts, that pass shows).
    grads, (nll_sum, count, aux) = micro_grads(jax.tree.map(lambda x: x[0], batch), 0)
    return grads, nll_sum, count, aux

  def body(carry, xs):
    grads, nll_sum, count, aux_sum = carry
    g, (nll, n, aux) = micro_grads(*xs)
    aux_sum = jax.tree.map(jnp.add, aux_sum, aux)
    return (jax.tree.map(jnp.add, grads, g), nll_sum + nll, count + n, aux_sum), None

  aux_shape = jax.eval_shape(lambda: loss_sums(params, jax.tree.map(lambda x: x[0], batch), rng, mdef)[1][2])
  zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)
  init = (jax.tree.map(jnp.zeros_like, params), jnp.float32(0), jnp.float32(0), zeros(aux_shape))
  (grads, nll_sum, count, aux_sum), _ = jax.lax.scan(body, init, (batch, jnp.arange(num_micro)))
  aux = jax.tree.map(lambda x: x / num_micro, aux_sum)
  return grads, nll_sum, count, aux


def train_step(state, batch, *, mdef, tx, schedule, use_router_noise: bool):
  rng, step_rng = jax.random.split(state['rng'])
  grads, nll_sum, count, aux = accumulate_grads(
      state['params'], batch, step_rng if use_router_noise else None, mdef)
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  loss = nll_sum / denom
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  # A non-finite loss or gradient never reaches the weights: the update is dropped whatever the
  # policy; the loop then stops (nan_policy='stop') or counts it and goes on ('skip').
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = {'step': state['step'] + 1, 'params': keep(params, state['params']),
               'opt_state': keep(opt_state, state['opt_state']), 'rng': rng}
  metrics = {'loss': loss, 'grad_norm': grad_norm, 'param_norm': optax.tree.norm(params),
             'learning_rate': schedule(state['step']), 'tokens': count, 'nonfinite': 1 - finite}
  metrics.update({f'moe/{k}': v for k, v in aux.items()})
  return new_state, metrics


def eval_step(params, batch, *, mdef):
  """Summed NLL and token count of a batch shaped like a train batch with one micro-batch."""
  batch = jax.tree.map(lambda x: x[0], batch)
  _, (nll_sum, count, _) = loss_sums(params, batch, None, mdef)
  return {'nll_sum': nll_sum, 'tokens': count}


def jit_train_step(mdef, tx, schedule, shardings, batch_sharding, use_router_noise=False):
  fn = functools.partial(train_step, mdef=mdef, tx=tx, schedule=schedule,
                         use_router_noise=use_router_noise)
  return jax.jit(fn, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                 donate_argnums=0)


def jit_eval_step(mdef, param_shardings, batch_sharding):
  return jax.jit(functools.partial(eval_step, mdef=mdef), in_shardings=(param_shardings, batch_sharding))
