"""Dense 65B decoder pre-training: SwiGLU, RoPE, RMSNorm, SentencePiece vocab 128,000, FSDP over
256 A100-80GB.

    python -m train --config experiments/dense_65b.py --workdir gs://BUCKET/dense_65b
    python -m train.plan --config experiments/dense_65b.py      # counts and memory, no allocation

Shape: 80 layers, d_model 8192, 64 heads of 128 (multi-head: kv_heads = heads, as the 65B
LLaMA-style model), MLP width 22,016 = 8/3 * 8192 rounded up to a multiple of 256. With the
128,000-token vocabulary (untied input and output tables) that is 66,858,524,672 parameters,
2.9% above 65B (the larger vocabulary adds 1.57B over a 32k one).

Sequence length: 2,048 tokens, the context of the 65B LLaMA-style setup this reproduces; the
seed fixes the batch in sequences (16,384) not in tokens, so the step is 33,554,432 tokens.

Batch: per-device 4 x 16 accumulation steps x 256 devices = 16,384 sequences per optimiser
step (`global_batch=16384, grad_accum=16`: each micro-batch of 1,024 sequences puts 4 on
each device of fsdp=256).

Length of the run: the seed does not state pre-training tokens; we assume the 1.4T tokens of
the LLaMA-65B recipe: 1.4e12 / 33,554,432 = 41,723 steps.

Optimiser exactly as the seed: AdamW b1=0.9 b2=0.95 eps=1e-6, cosine peaking at 2e-5 after
2,000 linear warm-up steps, decaying to 10% of peak; global-norm clipping 1.0. Weight decay is
not stated for this setup; we use 0.1 (the LLaMA value).
"""

from train.config import defaults

SEQ_LEN = 2048
TOKENS = 1.4e12
GLOBAL_BATCH = 16_384


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
