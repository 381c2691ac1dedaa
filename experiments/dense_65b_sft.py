"""Dense 65B supervised fine-tuning: the seed's SFT setup on top of experiments/dense_65b.py.

    python -m train.posttrain --config experiments/dense_65b_sft.py --workdir gs://BUCKET/sft \\
        --config.train.init_from=gs://BUCKET/dense_65b \\
        --config.data.sources.sft.path='gs://BUCKET/sft_data/*.jsonl'

Chat records, loss on assistant replies only, kept whole ('pad') in rows of 2,048. 1.5B tokens are
45 steps; the warm-up keeps its pre-training fraction, 2 steps (why: docs/experiments.md).
"""

from data.config import source_entry
from experiments import dense_65b

SFT_TOKENS = 1.5e9
EPOCHS = 1
STEPS_PER_EPOCH = -(-int(SFT_TOKENS) // (dense_65b.GLOBAL_BATCH * dense_65b.SEQ_LEN))  # 45.
PRETRAIN_WARMUP_FRACTION = 2_000 / dense_65b.get_config().train.steps  # 2,000 / 41,723.


def get_config():
  c = dense_65b.get_config()  # Model, mesh, AdamW, batch 16,384 with grad_accum 16 as there.
  c.data.sources.sft = source_entry('jsonl', 'sft', path='', sft_format='auto',
                                    eval_fraction=0.01)
  c.data.update(source='sft', packing='pad')
  steps = EPOCHS * STEPS_PER_EPOCH
  c.optim.update(warmup_steps=round(PRETRAIN_WARMUP_FRACTION * steps), weight_decay=0.0)
  c.train.update(steps=steps, log_every=1, ckpt_every=15, ckpt_keep=2, eval_every=15,
                 eval_batches=8)
  return c
