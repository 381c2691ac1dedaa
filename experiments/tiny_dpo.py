"""Tiny DPO: the SFT model trained on the embedded preference pairs against a frozen copy of itself.

    python -m train.posttrain --config experiments/tiny_dpo.py --workdir /tmp/tiny/dpo \\
        --config.train.init_from=/tmp/tiny/sft

beta 0.1 (the usual value); 100 steps of 32 pairs; a small learning rate, as for SFT.
"""

from experiments import tiny_rm


def get_config():
  c = tiny_rm.get_config()  # Its model, pairs in rows of 64, 32 a step, schedule shape.
  c.stage = 'dpo'
  c.optim.update(peak_lr=2e-4, warmup_steps=10)
  c.train.update(steps=100, log_every=20, ckpt_every=100)
  c.dpo.update(beta=0.1, precompute_ref=False, eval_batches=8)
  return c
