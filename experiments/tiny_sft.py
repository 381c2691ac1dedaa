"""Tiny SFT: experiments/tiny_dense.py's model fine-tuned on the embedded instruction pairs.

    python -m train.posttrain --config experiments/tiny_sft.py --workdir /tmp/tiny/sft \\
        --config.train.init_from=/tmp/tiny/pretrain

The generated question/answer pairs of data/corpus.py in the chat template, loss on the assistant
reply and its end marker only, kept whole ('pad') in rows of 128; 150 steps of 16 rows: 1.6 epochs.
"""

from experiments import tiny_dense


def get_config():
  c = tiny_dense.get_config()
  c.data.update(source='embedded_sft', packing='pad')
  c.optim.update(peak_lr=1e-3, warmup_steps=10, final_lr_frac=0.1, weight_decay=0.0)
  c.train.update(steps=150, global_batch=16, log_every=25, ckpt_every=150, eval_batches=4)
  return c
