"""Sparse MoE Mixtral-8x7B pre-training: 8 SwiGLU experts, top-2 routing, GQA, 32,768-token
context, BPE vocabulary 32,000; FSDP (ZeRO-3) over 512 H100-80GB.

    python -m train --config experiments/mixtral_8x7b.py --workdir gs://BUCKET/mixtral_8x7b
    python -m train.plan --config experiments/mixtral_8x7b.py   # counts, FLOPs, memory; no allocation

Shape (the published model): 32 layers, d_model 4096, 32 query / 8 key-value heads of 128,
expert MLP width 14,336, 8 experts with top-2 routing in every layer, RoPE theta 1e6, untied
output head. That is 46,702,792,704 parameters, 12,879,925,248 active per token (2 of 8
experts plus the router, attention, embeddings and head).

Batch: 4M tokens per step = 128 sequences of 32,768 tokens. Length of the run: 1.4T tokens /
4,194,304 tokens per step = 333,786 optimiser steps (333,786.1, rounded down).

Mesh (512 devices): fsdp=128 x tensor=4. 128 sequences cannot be split over 512 batch shards,
so 4 devices of each group of 4 share one sequence and split its work on a non-batch axis. We
choose `tensor` (Megatron-style: 32 query heads -> 8 per device, 8 kv heads -> 2, expert MLP
width 14,336 -> 3,584) over sequence/context sharding because its collectives stay inside one
8-GPU NVLink node (tensor=4 is adjacent in the device order), it divides every sharded width
exactly, and it also cuts the per-device activation memory of a 32k-token sequence by 4.
FSDP over the remaining 128 groups shards parameters and AdamW moments (ZeRO-3); every fsdp
shard takes one sequence per step (grad_accum=1). Experts are not sharded over a separate
`expert` axis here: with FSDP the expert weights are already split 128 ways over `fsdp`
(`expert_embed`), and an expert axis would steal batch shards we do not have.

Between layers the residual stream is split over `tensor` on its embed dim
(`sharding_rules.act_embed=tensor`, as Megatron's sequence parallelism splits it over the
sequence): the saved layer inputs that full remat keeps for all 32 layers are then a quarter as
large. XLA:TPU plans 10.8 GiB per v5p chip with it and 19.1 without (docs/scale.md, section 0).

Dispatch: dropless (sort by expert + grouped matmul, `jax.lax.ragged_dot`), as Mixtral was
trained without token dropping; on GPU the grouped matmul is the fast path.

Optimiser exactly as the seed: AdamW b1=0.9 b2=0.95 weight decay 0.1, cosine peaking at 3e-4
after 2,000 linear warm-up steps. Not stated by the seed, chosen here: decay to 10% of peak,
eps 1e-8, global-norm clipping 1.0, load-balancing loss weight 0.01 (Switch), router z-loss
weight 0.001 (ST-MoE).
"""

from train.config import defaults

SEQ_LEN = 32_768
GLOBAL_BATCH = 128
TOKENS = 1.4e12


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
  c.mesh.update(data=1, fsdp=128, expert=1, tensor=4)
  c.sharding_rules.act_embed = 'tensor'  # Residual stream split between layers (see above).
  c.optim.update(peak_lr=3e-4, warmup_steps=2_000, final_lr_frac=0.1, b1=0.9, b2=0.95, eps=1e-8,
                 weight_decay=0.1, clip_norm=1.0)
  c.train.update(steps=int(TOKENS // (GLOBAL_BATCH * SEQ_LEN)), global_batch=GLOBAL_BATCH,
                 grad_accum=1, log_every=10, ckpt_every=500, ckpt_keep=3)
  c.hardware.update(name='512 x NVIDIA H100-SXM5-80GB', peak_tflops=989.0, device_memory_gb=80.0)
  return c
