"""Dense 65B supervised fine-tuning: the seed's SFT setup on top of experiments/dense_65b.py.

    python -m train.posttrain --config experiments/dense_65b_sft.py --workdir gs://BUCKET/sft \\
        --config.train.init_from=gs://BUCKET/dense_65b \\
        --config.data.sources.sft.path='gs://BUCKET/sft_data/*.jsonl'

(`python -m train` runs it as well, with --config.data.tokenizer set to the pre-training run's
tokenizer; `train.posttrain` takes that from init_from.) The data are chat records (messages,
alpaca, self-instruct or prompt/response JSON lines, see data/chat.py) in the chat template;
the loss covers only assistant replies and their end markers. Examples stay whole ('pad'
packing) in rows of 2,048 tokens. Sharding, accumulation, checkpoints and metrics are those of
the pre-training run (train/loop.py).

As the seed states: AdamW b1=0.9, b2=0.95, eps=1e-6; peak learning rate 2e-5, cosine decay to
10% of peak; global-norm clipping 1.0; per-device batch 4 x 16 accumulation steps on 256 devices
= 16,384 sequences per optimiser step; 1.5B tokens of SFT data.

How many steps that is: one step holds 16,384 x 2,048 = 33,554,432 token slots, so 1.5e9 tokens
are 1.5e9 / 33,554,432 = 44.7, i.e. 45 optimiser steps per epoch (a few more in practice, since
'pad' packing leaves the ends of rows empty). The seed's 2,000 warm-up steps are therefore 44
times longer than one whole pass over the data: taken literally, the learning rate would still
be rising at 2% of its peak when the data run out, and train/config.py rejects a warm-up longer
than the run. The config has to choose, and it chooses this:
  * 2 epochs (train.steps = 90, about 3.0B tokens): the usual amount for SFT data, and more than
    one epoch gives the cosine schedule a meaningful length;
  * the warm-up scaled to the same fraction of the run it is in pre-training (2,000 of 41,723
    steps = 4.8%): 5 steps (`optim.warmup_steps = 5`);
  * the stated batch kept as is. (The other way to honour the 2,000 warm-up steps literally
    would be a batch about 50 times smaller, e.g. 256 sequences: 2,861 steps per epoch. That
    contradicts the stated 4 x 16 x 256 layout, so it is not done.)
Weight decay is not stated for SFT; 0.0 is used (common for fine-tuning; pre-training used 0.1).
"""

from data.config import source_entry
from experiments import dense_65b

SEQ_LEN = 2048
GLOBAL_BATCH = 16_384  # 4 per device x 16 accumulation steps x 256 devices.
SFT_TOKENS = 1.5e9
EPOCHS = 2
STEPS_PER_EPOCH = -(-int(SFT_TOKENS) // (GLOBAL_BATCH * SEQ_LEN))  # ceil(44.7) = 45.


def get_config():
  c = dense_65b.get_config()
  c.data.sources.sft = source_entry('jsonl', 'sft', path='', sft_format='auto',
                                    eval_fraction=0.01)
  c.data.update(source='sft', packing='pad', seq_len=SEQ_LEN)
  c.optim.update(peak_lr=2e-5, warmup_steps=5, final_lr_frac=0.1, b1=0.9, b2=0.95, eps=1e-6,
                 weight_decay=0.0, clip_norm=1.0)
  c.train.update(steps=EPOCHS * STEPS_PER_EPOCH, global_batch=GLOBAL_BATCH, grad_accum=16,
                 log_every=1, ckpt_every=45, ckpt_keep=2, eval_every=45, eval_batches=8)
  return c
