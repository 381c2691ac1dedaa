"""Dense 65B RLHF, the final stage: a reward model, then PPO from the SFT model.

    # 1. Reward model (the SFT model's trunk + a scalar head) on preference pairs:
    python -m train.posttrain --config experiments/dense_65b_rlhf.py:rm --workdir gs://B/rm \\
        --config.train.init_from=gs://B/sft --config.data.sources.pairs.path='gs://B/prefs/*.jsonl'
    # 2. PPO (the default stage of this file):
    python -m train.posttrain --config experiments/dense_65b_rlhf.py --workdir gs://B/ppo \\
        --config.train.init_from=gs://B/sft --config.ppo.reward_model=gs://B/rm \\
        --config.data.sources.sft.path='gs://B/sft_data/*.jsonl'

Kept from the seed's earlier stages (experiments/dense_65b.py, dense_65b_sft.py): the 65B dense
model, 256 A100-80GB, AdamW b1=0.9, b2=0.95, eps=1e-6, global-norm clipping 1.0, cosine decay to
10% of peak, sequences of 2,048 tokens. Everything below is not stated by the seed and chosen
here, with the reason:

Mesh: tensor=8 (within an 8-GPU NVLink node) x fsdp=32 for PPO, instead of fsdp=256: rollouts
decode one token at a time, and each step gathers the layer weights over the fsdp axis; with
tensor=8 a device gathers 1/8 of the model per step instead of all of it. The batch is then
split 32 ways, so rollout batches and minibatches are multiples of 32. The reward model trains
like SFT (fsdp=256).

Reward model: 1 epoch over the pairs (more overfits, as InstructGPT reports for its RMs);
assuming about 160,000 pairs (the size of Anthropic hh-rlhf's training split) at 512 pairs per
step: 313 steps, warm-up 10 (3%), peak 9e-6 (the order InstructGPT used for RM training), no
weight decay, margin 0 (plain Bradley-Terry).

PPO: 512 prompts per iteration, each rollout batch used for 2 epochs of 8 minibatches of 64
(InstructGPT-like batch 512 / minibatch 64); 500 iterations = 256,000 episodes, the order of
InstructGPT's PPO runs; 8,000 optimiser steps, of which 2% warm-up (160). Policy peak lr 1e-6
(RLHF actors of this size train at 5e-7..1e-6; SFT's 2e-5 would wreck the policy in a few
updates); critic peak 5e-6 (critics are usually run 5-10x hotter than the actor). Prompts up to
1,024 tokens, completions up to 512, sampled at temperature 1. KL: fixed coefficient 0.02 (the
value InstructGPT used), k1 estimator; gamma 1, lambda 0.95, clip 0.2 for ratio and values,
value coefficient 0.1, no entropy bonus, a penalty of 1.0 for completions that never end. The
critic starts from the reward model. The reference model is kept in host memory between uses
(ppo.ref_on_host) to leave room for the rollout KV cache: 512 x 1,536 slots x 80 layers x 64 kv
heads x 128 x 2 (k, v) in bfloat16 = 2.1 TB, 8 GB per device.

Per-device memory of PPO training (params/Adam in float32, sharded 256 ways): policy 1.0 GB +
Adam 2.1 GB, critic the same, reward model 1.0 GB, reference 1.0 GB (host): about 8 GB before
activations (remat 'full') and the rollout cache.
"""

from data.config import source_entry
from experiments import dense_65b
from train.posttrain.config import defaults

SEQ_LEN = 2048
RM_PAIRS = 160_000  # Assumed size of the preference data (hh-rlhf train: 160,800).
RM_BATCH = 512
PPO_ITERATIONS = 500
PPO_BATCH = 512


def _base(stage: str):
  c = defaults()
  pre = dense_65b.get_config()
  c.model.update(pre.model)
  c.hardware.update(pre.hardware)
  c.stage = stage
  c.data.update(packing='pad', seq_len=SEQ_LEN)
  c.optim.update(b1=0.9, b2=0.95, eps=1e-6, clip_norm=1.0, final_lr_frac=0.1, weight_decay=0.0)
  return c


def get_config(stage: str = 'ppo'):
  if stage == 'rm':
    c = _base('rm')
    c.data.sources.pairs = source_entry('jsonl', 'preference', path='', eval_fraction=0.01)
    c.data.source = 'pairs'
    c.mesh.update(data=1, fsdp=256, expert=1, tensor=1)
    steps = -(-RM_PAIRS // RM_BATCH)
    c.optim.update(peak_lr=9e-6, warmup_steps=10)
    c.train.update(steps=steps, global_batch=RM_BATCH, grad_accum=2, log_every=5,
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
