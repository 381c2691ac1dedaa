"""Dense 65B decoder pre-training, FSDP over 256 A100-80GB (values: docs/experiments.md).

    python -m train --config experiments/dense_65b.py --workdir gs://BUCKET/dense_65b
    python -m train.plan --config experiments/dense_65b.py      # counts and memory, no allocation
"""

from train.config import defaults

SEQ_LEN = 2048
TOKENS = 1.4e12  # Not stated by the seed: LLaMA-65B's; 41,723 steps.
GLOBAL_BATCH = 16_384  # Sequences: 4 per device x 16 accumulation steps x 256 devices.


def get_config():
  c = defaults()
  c.model.update(vocab_size=128_000, d_model=8192, num_layers=80, num_heads=64, num_kv_heads=64,
                 head_dim=128, mlp_dim=22_016, rope_theta=10_000.0, norm_eps=1e-5,
                 tie_embeddings=False, param_dtype='float32', compute_dtype='bfloat16',
                 scan_layers=True, remat='full', attention='cudnn')
  c.data.seq_len = SEQ_LEN
  c.data.tokenizer_type = 'unigram'
  c.mesh.update(data=1, fsdp=256, expert=1, tensor=1)
  c.optim.update(peak_lr=2e-5, warmup_steps=2_000, final_lr_frac=0.1, b1=0.9, b2=0.95, eps=1e-6,
                 weight_decay=0.1, clip_norm=1.0)
  c.train.update(steps=int(TOKENS // (GLOBAL_BATCH * SEQ_LEN)), global_batch=GLOBAL_BATCH,
                 grad_accum=16, log_every=10, ckpt_every=500, ckpt_keep=3)
  c.hardware.update(name='256 x NVIDIA A100-SXM4-80GB', peak_tflops=312.0, device_memory_gb=80.0)
  return c
