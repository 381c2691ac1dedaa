"""Tiny sparse MoE decoder on the embedded corpus: the README's CPU MoE run (a few minutes).

    python -m train --config experiments/tiny_moe.py --workdir /tmp/meshlm_tiny_moe

4 SwiGLU experts, top-2 in every layer, capacity dispatch (moe/* metrics: docs/moe.md). Variants:
  interleaved dense/MoE layers:  --config.model.moe_every=2
  dropless dispatch:             --config.model.dispatch=dropless
  expert parallel on 8 emulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8):
                                 --config.mesh.expert=4 --config.mesh.fsdp=2
"""

from experiments import tiny_dense


def get_config():
  c = tiny_dense.get_config()  # Its corpus, mesh, optimiser and schedule.
  c.model.update(num_kv_heads=2, num_experts=4, experts_per_token=2, moe_mlp_dim=256, moe_every=1,
                 dispatch='capacity', capacity_factor=1.25, router_jitter=0.0,
                 load_balance_weight=0.01, router_z_weight=0.001)
  c.train.sample_every = 0
  return c
