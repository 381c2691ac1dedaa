"""Tiny dense decoder on the embedded corpus: the README's CPU run (about two minutes).

    python -m train --config experiments/tiny_dense.py --workdir /tmp/meshlm_tiny
"""

from train.config import defaults


def get_config():
  c = defaults()
  c.model.update(vocab_size=2048, d_model=128, num_layers=4, num_heads=4, num_kv_heads=4,
                 mlp_dim=512, rope_theta=10_000.0, tie_embeddings=False)
  c.data.seq_len = 128
  c.data.tokenizer_type = 'bpe'  # The generated corpus supports ~2k BPE pieces (unigram: ~700).
  c.mesh.update(data=1, fsdp=-1, expert=1, tensor=1)
  c.optim.update(peak_lr=3e-3, warmup_steps=30, final_lr_frac=0.1, weight_decay=0.1, clip_norm=1.0)
  c.train.update(steps=200, global_batch=16, grad_accum=1, log_every=20, ckpt_every=100,
                 eval_batches=4, sample_every=100)
  return c
