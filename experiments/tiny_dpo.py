"""Tiny DPO: the SFT model trained on preference pairs against a frozen copy of itself.

    python -m train.posttrain --config experiments/tiny_dpo.py --workdir /tmp/tiny/dpo \\
        --config.train.init_from=/tmp/tiny/sft

beta 0.1 (the usual value); 300 steps of 32 pairs; a small learning rate, as for SFT; the chosen
reply's NLL added with weight 1 (RPO; `--config.dpo.nll_weight=0` is plain DPO): the setting the
sweep of benchmarks/results/posttrain_pipeline.md chose.
"""

from experiments import tiny_rm


def get_config():
  c = tiny_rm.get_config()  # Its model, pairs in rows of 64, 32 a step, schedule shape.
  c.stage = 'dpo'
  c.optim.update(peak_lr=2e-4, warmup_steps=10)
  c.train.update(steps=300, log_every=20, ckpt_every=100)
  c.dpo.update(beta=0.1, nll_weight=1.0, precompute_ref=False, eval_batches=8)
  return c
