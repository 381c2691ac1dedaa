"""Dense 65B GRPO in place of PPO: the model, mesh and AdamW of experiments/dense_65b_rlhf.py,
no reward model and no critic, a verifiable reward instead.

    python -m train.posttrain --config experiments/dense_65b_grpo.py --workdir gs://B/grpo \\
        --config.train.init_from=gs://B/sft --config.data.sources.sft.path='gs://B/gsm8k/*.jsonl'
    python -m train.plan --config experiments/dense_65b_grpo.py   # memory per device, no allocation

Data: GSM8K train as SFT records (a solution ending "#### N"); the reward (grpo.reward='gsm8k') is 1
when the reply's final number equals the record's, so the SFT model should already answer that way.
Values: docs/experiments.md (256 prompts x G=16 an iteration, DeepSeekMath's KL and lr).
"""

from data.config import source_entry
from experiments import dense_65b_rlhf


def get_config():
  c = dense_65b_rlhf._base('grpo')  # pylint: disable=protected-access
  c.data.sources.sft = source_entry('jsonl', 'sft', path='', eval_fraction=0.02)
  c.data.source = 'sft'
  c.mesh.update(data=1, fsdp=32, expert=1, tensor=8)
  c.optim.update(peak_lr=1e-6, warmup_steps=20)
  # 4 updates an iteration: log every iteration, save every 10.
  c.train.update(steps=100, global_batch=256, grad_accum=4, log_every=4,
                 ckpt_every=40, ckpt_keep=2)
  c.grpo.update(num_generations=16, scale_rewards=True, reward='gsm8k')
  c.ppo.update(max_prompt_len=512, max_new_tokens=512, temperature=1.0, ppo_epochs=1,
               num_minibatches=4, cliprange=0.2, kl_coef=0.04, kl_estimator='k3',
               ref_on_host=False, rollout_slots=0, eval_prompts=128)
  return c
