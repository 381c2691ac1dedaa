"""The one train step of every stage, its gradient accumulator and batch reshaper, and the LM loss.

A stage's loss is `loss_fn(params, micro, rng) -> (loss_sum, (count, metric_sums))`: the loss summed
over the `count` items of one micro-batch (target tokens, preference pairs, completion tokens), and
metric sums over them (one is 'loss'). A batch stacks `grad_accum` micro-batches on a leading axis
of every leaf ([accum, micro_batch, ...]); the step sums losses, gradients, counts and metric sums
over them, then divides by the batch's total count: 1 x 8 and 8 x 1 give the same update.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from model.sharding import constrain
from train.head_loss import head_nll_sum


def device_batch(local, grad_accum: int, sharding) -> dict:
  """Process-local numpy leaves [B_local, ...] -> global jax arrays [accum, micro, ...] on the mesh;
  `sharding`: one for every leaf, or ndim -> Sharding (e.g. Placement.batch_sharding)."""
  def put(x):
    x = np.asarray(x)
    x = x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])
    global_shape = (grad_accum, x.shape[1] * jax.process_count(), *x.shape[2:])
    where = sharding(x.ndim) if callable(sharding) else sharding
    return jax.make_array_from_process_local_data(where, x, global_shape)
  return jax.tree.map(put, local)


def accumulate(loss_fn, params, batch, rng):
  """(gradient sums, count, metric sums) of `loss_fn` over the micro-batches of `batch`; the
  micro-batch i gets rng fold_in(rng, i) (None stays None)."""
  grad_fn = jax.grad(loss_fn, has_aux=True)
  num_micro = jax.tree.leaves(batch)[0].shape[0]
  first = lambda tree: jax.tree.map(lambda x: x[0], tree)

  def micro_grads(micro, i):
    micro = jax.tree.map(lambda x: constrain(x, (('batch', 'length') + (None,) * x.ndim)[:x.ndim]),
                         micro)
    return grad_fn(params, micro, None if rng is None else jax.random.fold_in(rng, i))

  if num_micro == 1:  # No scan, no zero-initialised sums: one pass over the parameters fewer.
    grads, (count, sums) = micro_grads(first(batch), 0)
    return grads, count, sums

  def body(carry, xs):
    grads, count, sums = carry
    g, (n, s) = micro_grads(*xs)
    return (jax.tree.map(jnp.add, grads, g), count + n, jax.tree.map(jnp.add, sums, s)), None

  _, sums_shape = jax.eval_shape(lambda: loss_fn(params, first(batch), rng)[1])
  init = (jax.tree.map(jnp.zeros_like, params), jnp.float32(0),
          jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), sums_shape))
  (grads, count, sums), _ = jax.lax.scan(body, init, (batch, jnp.arange(num_micro)))
  return grads, count, sums


def train_step(state, batch, frozen, *, make_loss, tx, schedule, count_name: str = 'tokens',
               use_rng: bool = False, trained: tuple | None = None, grad_metrics=None):
  """One optimiser step of state {'step', 'params', 'opt_state', 'rng', ...}.

  make_loss(frozen) -> loss_fn: `frozen` (e.g. a DPO reference, or None) is a jitted argument, not a
  constant. `trained`: state keys trained as one tree {key: state[key]} (`tx` then takes that dict,
  e.g. per_key; the loss gets it as its params); None: state['params'] alone. Metrics: every metric
  sum / count, 'grad_norm', 'param_norm' (of the params kept), 'learning_rate', `count_name` (the
  count), 'nonfinite' (1: update dropped), and grad_metrics(grads) if given.
  """
  rng, step_rng = jax.random.split(state['rng'])
  old = state['params'] if trained is None else {k: state[k] for k in trained}
  grads, count, sums = accumulate(make_loss(frozen), old, batch, step_rng if use_rng else None)
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  metrics = {k: v / denom for k, v in sums.items()}
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state['opt_state'], old)
  # A non-finite loss or gradient never reaches the weights, whatever train.nan_policy (loop.py).
  finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(grad_norm)
  keep = lambda new, prev: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, prev)
  params = keep(optax.apply_updates(old, updates), old)
  new_state = dict(state, step=state['step'] + 1, opt_state=keep(opt_state, state['opt_state']),
                   rng=rng, **({'params': params} if trained is None else params))
  metrics.update({'grad_norm': grad_norm, 'param_norm': scaled_norm(params),
                  'learning_rate': schedule(state['step']), count_name: count,
                  'nonfinite': 1 - finite, **(grad_metrics(grads) if grad_metrics else {})})
  return new_state, metrics


def scaled_norm(tree):
  """The L2 norm of a tree's leaves, finite for every finite tree: scaled by the largest |x|
  first, so that huge (diverged but finite) params do not overflow to inf."""
  scale = jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in jax.tree.leaves(tree)]))
  scale = jnp.where(scale > 0, scale, 1.0).astype(jnp.float32)
  return scale * optax.tree.norm(jax.tree.map(lambda x: x / scale, tree))


def per_key(txs: dict) -> optax.GradientTransformation:
  """One transformation of a dict of trees {name: tree} that applies txs[name] to each."""
  def update(grads, state, params):
    out = {k: tx.update(grads[k], state[k], params[k]) for k, tx in txs.items()}
    return {k: u for k, (u, _) in out.items()}, {k: s for k, (_, s) in out.items()}
  return optax.GradientTransformation(lambda p: {k: tx.init(p[k]) for k, tx in txs.items()}, update)


def jit_step(make_loss, tx, schedule, shardings, batch_sharding=None, **options):
  """jitted (state, batch, frozen) -> (state, metrics) of train_step, `options` its keywords
  (count_name, use_rng, trained, grad_metrics); the state is donated."""
  fn = functools.partial(train_step, make_loss=make_loss, tx=tx, schedule=schedule, **options)
  return jax.jit(fn, in_shardings=(shardings, batch_sharding, None),
                 out_shardings=(shardings, None), donate_argnums=0)


# The language-model loss (pre-training, SFT).

def token_nll(logits_btv, targets_bt):
  """Per-token NLL in float32 (eval, references; the train step fuses it: train/head_loss.py)."""
  logits_btv = logits_btv.astype(jnp.float32)
  logz_bt = jax.nn.logsumexp(logits_btv, axis=-1)
  target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
  return logz_bt - target_logit_bt


def lm_loss(mdef):
  """loss_fn of the LM stages: metric sums 'loss' (NLL) and the MoE aux values 'moe/*'
  weighted by token count (so their means are token-weighted over micro-batches)."""
  def loss_fn(params, micro, rng):
    model = mdef.build(params)
    h_btd, aux = model.hidden(micro['inputs'], micro['positions'], micro['segment_ids'], rng)
    mask_bt = micro['loss_mask'].astype(jnp.float32)
    # sum(token_nll(model.logits(h_btd), targets) * mask), fused without [b, t, vocab] arrays.
    nll_sum = head_nll_sum(h_btd, model.head_matrix(), micro['targets'], mask_bt)
    count = jnp.sum(mask_bt)
    total = nll_sum + aux.get('aux_loss', 0.0) * count
    return total, (count, {'loss': nll_sum, **{f'moe/{k}': v * count for k, v in aux.items()}})
  return loss_fn
