"""Mixtral-8x7B SFT at a reduced learning rate on experiments/mixtral_8x7b.py (model, mesh, AdamW).

    python -m train.posttrain --config experiments/mixtral_8x7b_sft.py --workdir gs://B/mixtral_sft \\
        --config.train.init_from=gs://B/mixtral_8x7b \\
        --config.data.sources.sft.path='gs://B/sft_data/*.jsonl'

Chat records, loss on the assistant replies only, kept whole ('pad') (values: docs/experiments.md).
"""

from data.config import source_entry
from experiments import mixtral_8x7b

SEQ_LEN = 4096
GLOBAL_BATCH = 512  # 4 rows per fsdp group: one micro-batch fits.
SFT_TOKENS = 1.5e9
EPOCHS = 1
STEPS_PER_EPOCH = -(-int(SFT_TOKENS) // (GLOBAL_BATCH * SEQ_LEN))  # ceil(715.3) = 716.


def get_config():
  c = mixtral_8x7b.get_config()
  c.data.sources.sft = source_entry('jsonl', 'sft', path='', sft_format='auto',
                                    eval_fraction=0.01)
  c.data.update(source='sft', packing='pad', seq_len=SEQ_LEN)
  steps = EPOCHS * STEPS_PER_EPOCH
  c.optim.update(peak_lr=1e-5, warmup_steps=round(0.03 * steps), weight_decay=0.0)
  c.train.update(steps=steps, global_batch=GLOBAL_BATCH, grad_accum=1, log_every=10,
                 ckpt_every=250, ckpt_keep=2, eval_every=250, eval_batches=8)
  return c
