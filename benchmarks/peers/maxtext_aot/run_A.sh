#!/bin/bash
# Setup A: dense 65B, v5p-512 (=256 chips), pure FSDP 256. Usage: run_A.sh TAG GA [extra key=value...]
cd /work/maxtext && . venv/bin/activate
export ALLOW_MULTIPLE_LIBTPU_LOAD=1  # /tmp/libtpu_lockfile may be held by another user on this shared box
TAG=$1; GA=$2; shift 2
CFG=venv/lib/python3.12/site-packages/maxtext/configs/base.yml
exec /usr/bin/time -v python aot_driver.py out/$TAG $CFG run_name=$TAG \
  compile_topology=v5p-512 compile_topology_num_slices=1 hardware=tpu \
  model_name=default decoder_block=llama2 \
  base_num_decoder_layers=80 base_emb_dim=8192 base_num_query_heads=64 base_num_kv_heads=64 head_dim=128 \
  base_mlp_dim=22016 vocab_size=128000 "mlp_activations=[silu,linear]" logits_via_embedding=False \
  normalization_layer_epsilon=1.0e-5 rope_max_timescale=10000 \
  dtype=bfloat16 weight_dtype=float32 \
  max_target_length=2048 per_device_batch_size=4 gradient_accumulation_steps=$GA \
  ici_fsdp_parallelism=256 ici_data_parallelism=1 ici_tensor_parallelism=1 ici_expert_parallelism=1 \
  ici_sequence_parallelism=1 ici_context_parallelism=1 ici_pipeline_parallelism=1 ici_fsdp_transpose_parallelism=1 \
  ici_tensor_sequence_parallelism=1 ici_autoregressive_parallelism=1 \
  dcn_data_parallelism=1 dcn_fsdp_parallelism=1 dcn_pipeline_parallelism=1 \
  remat_policy=full attention=flash scan_layers=True opt_type=adamw \
  enable_dropout=False dataset_type=synthetic enable_checkpointing=False "$@"
