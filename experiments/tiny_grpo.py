"""Tiny GRPO: the SFT policy, the embedded task's exact checker as the reward, KL to SFT.

    python -m train.posttrain --config experiments/tiny_grpo.py --workdir /tmp/tiny/grpo \\
        --config.train.init_from=/tmp/tiny/sft

Prompts are the user turns of the embedded instruction pairs; a completion scores 1 (exactly the
answer) or 0, with advantages relative to its group and no value or reward model. Groups whose
completions all score the same are replaced from up to 4 rounds of prompts (dynamic sampling).
The learning rate, KL coefficient, iterations and rounds: the best of the sweeps of
benchmarks/results/posttrain_pipeline.md.
"""

from experiments import tiny_ppo


def get_config():
  c = tiny_ppo.get_config()  # Its model, prompts, rollout lengths, epochs and minibatches.
  c.stage = 'grpo'
  c.optim.peak_lr = 1e-4
  # log_every and ckpt_every count updates (4 an iteration).
  c.train.update(steps=300, global_batch=16, log_every=40, ckpt_every=400)
  c.ppo.update(kl_coef=0.1, kl_estimator='k3', missing_eos_penalty=0.0)
  c.grpo.update(num_generations=8, scale_rewards=True, reward='embedded', sampling_rounds=4)
  return c
