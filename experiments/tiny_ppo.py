"""Tiny RLHF with PPO: the SFT policy, the tiny reward model, KL to the SFT reference.

    python -m train.posttrain --config experiments/tiny_ppo.py --workdir /tmp/tiny/ppo \\
        --config.train.init_from=/tmp/tiny/sft --config.ppo.reward_model=/tmp/tiny/rm

Prompts are the user turns of the embedded instruction pairs; completions of up to 32 tokens (the
longest answers take about 28). Results: benchmarks/results/posttrain_pipeline.md.
"""

from experiments import tiny_dense
from train.posttrain.config import defaults


def get_config():
  c = defaults()
  c.stage = 'ppo'
  c.model.update(tiny_dense.get_config().model)
  c.data.update(source='embedded_sft', packing='pad', seq_len=128)
  c.optim.update(peak_lr=5e-5, warmup_steps=10, final_lr_frac=0.5, weight_decay=0.0)
  # log_every and ckpt_every count updates (4 an iteration): every 5 iterations, at the end.
  c.train.update(steps=40, global_batch=32, log_every=20, ckpt_every=160)
  c.ppo.update(max_prompt_len=32, max_new_tokens=32, temperature=1.0, ppo_epochs=2,
               num_minibatches=2, kl_coef=0.05, kl_estimator='k1', critic_lr=5e-4,
               vf_coef=0.1, missing_eos_penalty=1.0, eval_prompts=64)
  return c
