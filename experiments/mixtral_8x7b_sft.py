"""Mixtral-8x7B-shaped MoE: instruction fine-tuning at a reduced learning rate.

    python -m train.posttrain --config experiments/mixtral_8x7b_sft.py --workdir gs://B/mixtral_sft \\
        --config.train.init_from=gs://B/mixtral_8x7b \\
        --config.data.sources.sft.path='gs://B/sft_data/*.jsonl'

Model (the values of experiments/mixtral_8x7b.py): vocab 32,000, d_model 4,096, 32 layers, 32
query / 8 kv heads of 128, every layer a mixture of 8 SwiGLU experts of width 14,336 with top-2
routing, RoPE theta 1e6, untied output table: 46.7B parameters, 12.9B active per token.

Fine-tuning choices (none stated by the seed for this model):
  * peak learning rate 1e-5, half the dense 65B SFT's 2e-5: sparse models overfit faster in
    fine-tuning (ST-MoE), and the router is easily destabilised; AdamW b1=0.9, b2=0.95,
    eps=1e-6, clipping 1.0, cosine to 10%, no weight decay, as the dense SFT;
  * the same 1.5B SFT tokens for 2 epochs, in rows of 4,096 tokens, 512 rows per step
    (2,097,152 tokens): 1.5e9 / 2,097,152 = 715.3 -> 716 steps per epoch, 1,432 in all, with a
    3% warm-up of 43 steps;
  * routing with the repository's default auxiliary weights (load balancing 0.01, router z-loss
    0.001; Switch Transformer / ST-MoE values), no jitter,
    capacity factor 1.25 per row with 'capacity' dispatch; the auxiliary losses keep the
    experts balanced on the narrower SFT distribution;
  * mesh expert=8 x fsdp=32 on the same 256 devices: each expert group of 32 devices holds one
    expert's weights, tokens reach their experts by all-to-all (model/moe.py); micro-batch 256
    rows (1 per device, 2 accumulation steps).
"""

from data.config import source_entry
from train.config import defaults

SEQ_LEN = 4096
GLOBAL_BATCH = 512
SFT_TOKENS = 1.5e9
EPOCHS = 2
STEPS_PER_EPOCH = -(-int(SFT_TOKENS) // (GLOBAL_BATCH * SEQ_LEN))  # ceil(715.3) = 716.


def model_values() -> dict:
  return dict(vocab_size=32_000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
              head_dim=128, mlp_dim=14_336, moe_mlp_dim=14_336, num_experts=8,
              experts_per_token=2, moe_every=1, rope_theta=1e6, norm_eps=1e-5,
              tie_embeddings=False, capacity_factor=1.25, dispatch='capacity',
              router_jitter=0.0, load_balance_weight=0.01, router_z_weight=0.001,
              param_dtype='float32', compute_dtype='bfloat16', scan_layers=True, remat='full',
              attention='auto')


def get_config():
  c = defaults()
  c.model.update(model_values())
  c.data.sources.sft = source_entry('jsonl', 'sft', path='', sft_format='auto',
                                    eval_fraction=0.01)
  c.data.update(source='sft', packing='pad', seq_len=SEQ_LEN)
  c.mesh.update(data=1, fsdp=32, expert=8, tensor=1)
  steps = EPOCHS * STEPS_PER_EPOCH
  c.optim.update(peak_lr=1e-5, warmup_steps=round(0.03 * steps), final_lr_frac=0.1, b1=0.9,
                 b2=0.95, eps=1e-6, weight_decay=0.0, clip_norm=1.0)
  c.train.update(steps=steps, global_batch=GLOBAL_BATCH, grad_accum=2, log_every=10,
                 ckpt_every=250, ckpt_keep=2, eval_every=250, eval_batches=8)
  c.hardware.update(name='256 x NVIDIA A100-SXM4-80GB', peak_tflops=312.0, device_memory_gb=80.0)
  return c
