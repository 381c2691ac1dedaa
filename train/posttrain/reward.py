"""Reward model: the decoder with a scalar head (model/heads.py), trained on preference pairs.

Loss (Bradley-Terry): -log sigmoid(r_chosen - r_rejected - rm.margin). A sequence's reward is the
head's output at its last real token (segment_ids > 0), whatever the padding. Metrics (means):
docs/posttrain.md. `RewardScorer` scores rollouts and chats (PPO, task_eval.py); `ensemble`
combines several (PPO's ppo.reward_ensemble).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from data import chat as chat_lib
from data import packing
from model.heads import ScalarModel, at_index, last_index, trunk_config
from train import config as base_config
from train import state as state_lib
from train import workdir as workdir_lib
from train.posttrain import pairs


def trunk_and_head(checkpoint: str, cfg, placement, fresh):
  """ScalarModel params: an LM checkpoint's `decoder` trunk (no output table), `fresh`'s head."""
  trunk = workdir_lib.restore_params(checkpoint, trunk_config(cfg), placement)
  return {'decoder': trunk, 'head': fresh['head']}


def sequence_rewards(scores_bt, segment_ids_bt):
  """float32 [b]: the score at each row's last real (segment id > 0) token."""
  return at_index(scores_bt, last_index(segment_ids_bt > 0))


def bt_loss(r_chosen_b, r_rejected_b, margin=0.0):
  """Per-pair -log sigmoid(r_chosen - r_rejected - margin)."""
  return -jax.nn.log_sigmoid(r_chosen_b - r_rejected_b - margin)


def rewards(model, rows: dict):
  """(float32 [b] rewards, aux) of rows {'inputs', 'positions', 'segment_ids'}."""
  scores_bt, aux = model(rows['inputs'], rows['positions'], rows['segment_ids'])
  return sequence_rewards(scores_bt, rows['segment_ids']), aux


def loss_fn(params, micro, rng=None, *, mdef, margin=0.0):
  """Summed BT loss of a micro-batch of pairs: (loss_sum, (pair_count, metric_sums)) (step.py)."""
  del rng
  m, both = pairs.both_sides(micro)
  r_b, aux = rewards(mdef.build(params), both)
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
    return dict(state, params=trunk_and_head(config.train.init_from, ctx.cfg, ctx, state['params']))

  return pairs.stage(
      config, name='rm', model_cls=ScalarModel, init_state=init_state,
      make_loss=lambda mdef, frozen: functools.partial(loss_fn, mdef=mdef, margin=margin),
      shown=('rm/accuracy', 'rm/margin', 'rm/chosen', 'rm/rejected'))


def run_model_config(path: str):
  """The ModelConfig of the run a checkpoint path belongs to (its config.json)."""
  return base_config.model_config(workdir_lib.load_config(None, workdir_lib.run_workdir(path)))


def reward_layout(out, end_id: int, newline: list[int]) -> dict:
  """A train/generate.py result as the RM saw pairs in training: completions ending with `<|end|>`
  get the newline that follows it in data/chat.py."""
  lay, num_new_b, prompt_len = out.layout(), out.num_new_b, out.prompt_len
  b, k = lay['tokens'].shape[0], len(newline)
  tokens, segs, positions = (np.concatenate([lay[key], np.zeros((b, k), np.int32)], axis=1)
                             for key in ('tokens', 'segment_ids', 'positions'))
  for i in range(b):
    end = prompt_len + int(num_new_b[i])
    if num_new_b[i] and tokens[i, end - 1] == end_id:
      tokens[i, end:end + k] = newline
      segs[i, end:end + k] = 1
      positions[i, end:end + k] = positions[i, end - 1] + 1 + np.arange(k)
  return {'inputs': tokens, 'positions': positions, 'segment_ids': segs}


class RewardScorer:
  """Scores by the reward model of run `rm_workdir` (placed by a Placement), float32 [b]:
  `scorer(out)` of a train/generate.py result (`reward_layout`), `scorer.messages(conversations)` of
  whole chats as the preference stages see them (packing.lm_example of data/chat.py's rendering)."""

  def __init__(self, rm_workdir: str, tok, placement):
    rm_cfg = run_model_config(rm_workdir)
    mdef, _ = state_lib.model_def(rm_cfg, ScalarModel)
    self.params = workdir_lib.restore_params(rm_workdir, rm_cfg, placement, ScalarModel)
    self.fn = jax.jit(lambda p, rows: rewards(mdef.build(p), rows)[0])
    self.template, self.mesh = chat_lib.ChatTemplate(tok), placement.mesh
    self.end, self.newline = tok.special_id('<|end|>'), list(self.template.newline)

  def rows(self, rows) -> np.ndarray:
    with jax.set_mesh(self.mesh):
      return np.asarray(self.fn(self.params, rows), np.float32)

  def __call__(self, out) -> np.ndarray:
    return self.rows(reward_layout(out, self.end, self.newline))

  def messages(self, conversations: list[list[dict]]) -> np.ndarray:
    examples = [packing.lm_example(*self.template.encode(m)) for m in conversations]
    width = max(len(e['inputs']) for e in examples)
    rows = [packing.pack_examples([e], width, 'pad', self.template.tok.pad_id) for e in examples]
    return self.rows({k: np.concatenate([r[k] for r in rows])
                      for k in ('inputs', 'positions', 'segment_ids')})


def ensemble(scorers: list, calibration, combine: str):
  """One scorer of several reward models (Coste et al. 2023): each member's scores standardised by
  their mean and std on `calibration` (a fixed train/generate.py result, so the same every call),
  then the members' mean ('mean') or, worst case, their minimum ('min'). float32 [b] of `out`."""
  stats = [(float(s.mean()), float(s.std()) + 1e-6) for s in (f(calibration) for f in scorers)]
  reduce = {'mean': np.mean, 'min': np.min}[combine]
  return lambda out: reduce(np.stack([(f(out) - mu) / sd for f, (mu, sd) in zip(scorers, stats)]),
                            axis=0).astype(np.float32)
