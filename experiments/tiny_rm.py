"""Tiny reward model: the SFT model's trunk + a scalar head on the embedded preference pairs.

    python -m train.posttrain --config experiments/tiny_rm.py --workdir /tmp/tiny/rm \\
        --config.train.init_from=/tmp/tiny/sft

300 steps of 32 pairs: 9,600 pairs, about two epochs of the 5,000 generated ones.
"""

from experiments import tiny_dense
from train.posttrain.config import defaults


def get_config():
  c = defaults()
  c.stage = 'rm'
  c.model.update(tiny_dense.get_config().model)
  c.data.update(source='embedded_preference', packing='pad', seq_len=64)
  c.optim.update(peak_lr=1e-3, warmup_steps=20, final_lr_frac=0.1, weight_decay=0.0)
  c.train.update(steps=300, global_batch=32, log_every=25, ckpt_every=300)
  c.rm.update(margin=0.0, eval_batches=8)
  return c
