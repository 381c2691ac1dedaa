"""Tiny sparse MoE decoder on the embedded corpus: the README's CPU MoE run (a few minutes).

    python -m train --config experiments/tiny_moe.py --workdir /tmp/meshlm_tiny_moe

4 layers of d_model 128, 4 query / 2 key-value heads (GQA), 4 SwiGLU experts of width 256 with
top-2 routing in every layer, capacity dispatch (factor 1.25). TensorBoard (`tb/` in the
workdir) and metrics.jsonl get, per logged step, moe/load_balance_loss and moe/router_z_loss
(unweighted, averaged over MoE layers), moe/aux_loss (weighted, summed: what is added to the
loss), moe/expert_load_min / max, moe/dropped_fraction and moe/router_entropy.

Variants (plain CLI overrides):
  interleaved dense/MoE layers:  --config.model.moe_every=2
  dropless dispatch:             --config.model.dispatch=dropless
  expert parallel on 8 emulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8):
                                 --config.mesh.expert=4 --config.mesh.fsdp=2
"""

from train.config import defaults


def get_config():
  c = defaults()
  c.model.update(vocab_size=2048, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2,
                 mlp_dim=512, rope_theta=10_000.0, tie_embeddings=False,
                 num_experts=4, experts_per_token=2, moe_mlp_dim=256, moe_every=1,
                 dispatch='capacity', capacity_factor=1.25, router_jitter=0.0,
                 load_balance_weight=0.01, router_z_weight=0.001)
  c.data.seq_len = 128
  c.data.tokenizer_type = 'bpe'  # The generated corpus supports ~2k BPE pieces (unigram: ~700).
  c.mesh.update(data=1, fsdp=-1, expert=1, tensor=1)
  c.optim.update(peak_lr=3e-3, warmup_steps=30, final_lr_frac=0.1, weight_decay=0.1, clip_norm=1.0)
  c.train.update(steps=200, global_batch=16, grad_accum=1, log_every=20, ckpt_every=100,
                 eval_batches=4)
  return c
