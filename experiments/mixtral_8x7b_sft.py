"""Mixtral-8x7B instruction fine-tuning (SFT) at a reduced learning rate, on top of
experiments/mixtral_8x7b.py.

    python -m train.posttrain --config experiments/mixtral_8x7b_sft.py --workdir gs://B/mixtral_sft \\
        --config.train.init_from=gs://B/mixtral_8x7b \\
        --config.data.sources.sft.path='gs://B/sft_data/*.jsonl'

Inherited unchanged from the pre-training config: the model (46.7B parameters, 12.9B active;
8 experts, top-2, dropless dispatch as Mixtral is trained, the same auxiliary loss weights),
the 512 x H100 mesh fsdp=128 x tensor=4, AdamW b1=0.9, b2=0.95, eps=1e-8, clipping 1.0 and the
cosine decay to 10% of peak. The data are chat records in the chat template (data/chat.py),
with the loss on the assistant replies only, kept whole ('pad' packing).

Changed for fine-tuning (none of it is stated by the seed for this model; chosen here):
  * peak learning rate 1e-5, 1/30 of pre-training's 3e-4 and half the dense 65B SFT's 2e-5:
    instruction data are tiny next to 46.7B parameters, and a low rate keeps the fine-tuned
    model and its router close to the pre-trained ones. No weight decay (pre-training: 0.1).
  * rows of 4,096 tokens instead of 32,768 (instructions are short; 'pad' packing would
    leave most of a 32k row empty), 512 rows per step = 2,097,152 token slots: 4 rows per
    fsdp group, 16,384 tokens, half the 32,768 a group holds in pre-training, so one
    micro-batch fits (grad_accum=1).
  * 1.5B tokens of SFT data, the dense 65B SFT's budget, seen once:
    1.5e9 / 2,097,152 = 715.3 -> 716 steps (EPOCHS below).
  * warm-up 21 steps (3% of the run): pre-training's 2,000 warm-up steps are longer than the
    whole fine-tuning run, which train/config.py rejects.
"""

from data.config import source_entry
from experiments import mixtral_8x7b

SEQ_LEN = 4096
GLOBAL_BATCH = 512
SFT_TOKENS = 1.5e9
EPOCHS = 1
STEPS_PER_EPOCH = -(-int(SFT_TOKENS) // (GLOBAL_BATCH * SEQ_LEN))  # ceil(715.3) = 716.
PEAK_LR = 1e-5


def get_config():
  c = mixtral_8x7b.get_config()
  c.data.sources.sft = source_entry('jsonl', 'sft', path='', sft_format='auto',
                                    eval_fraction=0.01)
  c.data.update(source='sft', packing='pad', seq_len=SEQ_LEN)
  steps = EPOCHS * STEPS_PER_EPOCH
  c.optim.update(peak_lr=PEAK_LR, warmup_steps=round(0.03 * steps), weight_decay=0.0)
  c.train.update(steps=steps, global_batch=GLOBAL_BATCH, grad_accum=1, log_every=10,
                 ckpt_every=250, ckpt_keep=2, eval_every=250, eval_batches=8)
  return c
