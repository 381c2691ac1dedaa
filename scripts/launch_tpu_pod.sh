#!/usr/bin/env bash
# Cloud TPU pod slice (TPU VMs): the same command on every host. JAX's TPU cluster detectors
# (`gcetpu`, `gketpu`) read the worker id, host count and coordinator from the TPU metadata,
# so only distributed.enabled is set. Not run here (no TPU); see docs/scale.md.
#
#   scripts/launch_tpu_pod.sh TPU_NAME ZONE experiments/dense_65b.py gs://BUCKET/dense_65b \
#       --config.model.attention=splash [--config.key=value ...]
#
# The repository is expected at ~/meshlm on every host (e.g. after
# `gcloud compute tpus tpu-vm scp --recurse --worker=all . TPU_NAME:~/meshlm --zone ZONE`) with
# jax[tpu] installed. On GKE TPU node pools the same environment variable works in the pod
# spec (JAX's GKE TPU detector), see scripts/k8s/meshlm_gpu_job.yaml for the Job shape.
set -euo pipefail

tpu=${1:?usage: scripts/launch_tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]}
zone=${2:?zone}
config=${3:?config}
workdir=${4:?workdir}
shift 4
extra=$(printf ' %q' "$@")

gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/meshlm && MESHLM_DISTRIBUTED=1 python -m train --config $config --workdir $workdir$extra"
