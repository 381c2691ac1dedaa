"""Dense 65B RLHF, the final stage: a reward model, then PPO from the SFT model.

    # 1. Reward model (the SFT model's trunk + a scalar head) on preference pairs:
    python -m train.posttrain --config experiments/dense_65b_rlhf.py:rm --workdir gs://B/rm \\
        --config.train.init_from=gs://B/sft --config.data.sources.pairs.path='gs://B/prefs/*.jsonl'
    # 2. PPO (the default stage of this file):
    python -m train.posttrain --config experiments/dense_65b_rlhf.py --workdir gs://B/ppo \\
        --config.train.init_from=gs://B/sft --config.ppo.reward_model=gs://B/rm \\
        --config.data.sources.sft.path='gs://B/sft_data/*.jsonl'

The model, hardware and AdamW come from the earlier stages; the rest (reasons: docs/experiments.md):
PPO on tensor=8 x fsdp=32 (rollouts gather 1/8 of the weights per step), the reward model 1 epoch
over the pairs, PPO InstructGPT-like, the reference in host memory (room for the KV cache).
"""

from data.config import source_entry
from experiments import dense_65b
from train.posttrain.config import defaults

RM_PAIRS = 160_000  # Assumed size of the preference data (hh-rlhf train: 160,800).
RM_BATCH = 512
PPO_ITERATIONS = 500
PPO_BATCH = 512


def _base(stage: str):
  c = defaults()
  pre = dense_65b.get_config()
  for section in ('model', 'mesh', 'optim', 'hardware'):  # Pre-training's; fsdp=256.
    c[section].update(pre[section])
  c.stage = stage
  c.data.update(packing='pad', seq_len=pre.data.seq_len)
  c.optim.weight_decay = 0.0
  return c


def get_config(stage: str = 'ppo'):
  if stage == 'rm':
    c = _base('rm')
    c.data.sources.pairs = source_entry('jsonl', 'preference', path='', eval_fraction=0.01)
    c.data.source = 'pairs'
    c.optim.update(peak_lr=9e-6, warmup_steps=10)
    c.train.update(steps=-(-RM_PAIRS // RM_BATCH), global_batch=RM_BATCH, grad_accum=2, log_every=5,
                   ckpt_every=100, ckpt_keep=2)
    c.rm.update(margin=0.0, eval_batches=16)
    return c
  if stage != 'ppo':
    raise ValueError(f'experiments/dense_65b_rlhf.py: stage {stage!r}; use :rm or :ppo')
  c = _base('ppo')
  c.data.sources.sft = source_entry('jsonl', 'sft', path='', eval_fraction=0.01)
  c.data.source = 'sft'
  c.mesh.update(data=1, fsdp=32, expert=1, tensor=8)
  c.optim.update(peak_lr=1e-6, warmup_steps=160)
  # log_every and ckpt_every count updates (2 x 8 an iteration): every iteration, every 25.
  c.train.update(steps=PPO_ITERATIONS, global_batch=PPO_BATCH, grad_accum=1, log_every=16,
                 ckpt_every=400, ckpt_keep=2)
  c.ppo.update(max_prompt_len=1024, max_new_tokens=512, temperature=1.0, ppo_epochs=2,
               num_minibatches=8, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, ent_coef=0.0,
               gamma=1.0, lam=0.95, kl_coef=0.02, kl_estimator='k1', adaptive_kl=False,
               missing_eos_penalty=1.0, critic_lr=5e-6, critic_init='reward_model',
               ref_on_host=True, eval_prompts=512)
  return c
