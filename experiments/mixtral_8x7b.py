"""Sparse MoE Mixtral-8x7B pre-training, FSDP (ZeRO-3) over 512 H100-80GB (docs/experiments.md).

    python -m train --config experiments/mixtral_8x7b.py --workdir gs://BUCKET/mixtral_8x7b
    python -m train.plan --config experiments/mixtral_8x7b.py   # counts, FLOPs, memory; no allocation
"""

from train.config import defaults

SEQ_LEN = 32_768
GLOBAL_BATCH = 128  # 4M tokens per step.
TOKENS = 1.4e12  # 333,786 steps.


def get_config():
  c = defaults()
  c.model.update(vocab_size=32_000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                 head_dim=128, mlp_dim=14_336, rope_theta=1e6, norm_eps=1e-5,
                 tie_embeddings=False, param_dtype='float32', compute_dtype='bfloat16',
                 scan_layers=True, remat='full', attention='cudnn',
                 num_experts=8, experts_per_token=2, moe_mlp_dim=14_336, moe_every=1,
                 dispatch='dropless', capacity_factor=1.25, router_jitter=0.0,
                 load_balance_weight=0.01, router_z_weight=0.001)
  c.data.seq_len = SEQ_LEN
  c.data.tokenizer_type = 'bpe'
  c.mesh.update(data=1, fsdp=128, expert=1, tensor=4)  # Tensor within an NVLink node.
  c.sharding_rules.act_embed = 'tensor'  # Residual stream split between layers.
  c.optim.update(peak_lr=3e-4, warmup_steps=2_000, final_lr_frac=0.1, b1=0.9, b2=0.95, eps=1e-8,
                 weight_decay=0.1, clip_norm=1.0)
  c.train.update(steps=int(TOKENS // (GLOBAL_BATCH * SEQ_LEN)), global_batch=GLOBAL_BATCH,
                 grad_accum=1, log_every=10, ckpt_every=500, ckpt_keep=3)
  c.hardware.update(name='512 x NVIDIA H100-SXM5-80GB', peak_tflops=989.0, device_memory_gb=80.0)
  return c
