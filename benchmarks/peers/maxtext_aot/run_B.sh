#!/bin/bash
# Setup B: Mixtral-8x7B, v5p-1024 (=512 chips), FSDP 128 x TP 4, dropless megablox. Usage: run_B.sh TAG [extra key=value...]
cd /work/maxtext && . venv/bin/activate
export ALLOW_MULTIPLE_LIBTPU_LOAD=1  # /tmp/libtpu_lockfile may be held by another user on this shared box
TAG=$1; shift 1
CFG=venv/lib/python3.12/site-packages/maxtext/configs/base.yml
exec /usr/bin/time -v python aot_driver.py out/$TAG $CFG run_name=$TAG \
  compile_topology=v5p-1024 compile_topology_num_slices=1 hardware=tpu \
  model_name=mixtral-8x7b \
  dtype=bfloat16 weight_dtype=float32 \
  max_target_length=32768 per_device_batch_size=0.25 gradient_accumulation_steps=1 \
  ici_fsdp_parallelism=128 ici_tensor_parallelism=4 ici_data_parallelism=1 ici_expert_parallelism=1 \
  ici_sequence_parallelism=1 ici_context_parallelism=1 ici_pipeline_parallelism=1 ici_fsdp_transpose_parallelism=1 \
  ici_tensor_sequence_parallelism=1 ici_autoregressive_parallelism=1 \
  dcn_data_parallelism=1 dcn_fsdp_parallelism=1 dcn_pipeline_parallelism=1 \
  sparse_matmul=True megablox=True capacity_factor=-1.0 ragged_buffer_factor=-1.0 \
  remat_policy=full attention=flash scan_layers=True opt_type=adamw \
  enable_dropout=False dataset_type=synthetic enable_checkpointing=False allow_split_physical_axes=True "$@"
