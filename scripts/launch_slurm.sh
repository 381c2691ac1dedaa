#!/usr/bin/env bash
# SLURM: one training process per GPU, joined by jax.distributed with JAX's SLURM detection.
# Not run in this repository's CI (no cluster); see docs/scale.md for what was run.
#
#   sbatch scripts/launch_slurm.sh experiments/dense_65b.py /shared/runs/dense_65b [--config.x=y ...]
#
# The defaults below are the 256 x A100-80GB layout of experiments/dense_65b.py (32 nodes x 8
# GPUs); for experiments/mixtral_8x7b.py use --nodes=64 (512 x H100). Override on the sbatch
# command line (sbatch --nodes=64 ...). JAX reads SLURM_JOB_ID, SLURM_STEP_NODELIST (the first
# node hosts the coordinator), SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID (which GPU this
# process drives), so no address or rank is passed by hand.
#SBATCH --job-name=meshlm
#SBATCH --nodes=32
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail

config=${1:?usage: sbatch scripts/launch_slurm.sh CONFIG WORKDIR [--config.key=value ...]}
workdir=${2:?usage: sbatch scripts/launch_slurm.sh CONFIG WORKDIR [--config.key=value ...]}
shift 2
repo=${MESHLM_REPO:-$(cd "$(dirname "$0")/.." && pwd)}
python_bin=${PYTHON:-python}

# Plan first (no devices needed): stops here if the config cannot run or does not fit.
plan_txt="meshlm-plan-${SLURM_JOB_ID:-local}.txt"
"$python_bin" -m train.plan --config "$repo/$config" "$@" > "$plan_txt" || {
  echo "train.plan rejected $config; see $plan_txt" >&2; exit 1; }

# MESHLM_CLUSTER=slurm pins JAX's detector (auto-detection would also find it).
srun --kill-on-bad-exit=1 --export=ALL,MESHLM_CLUSTER=slurm,PYTHONPATH="$repo" \
  "$python_bin" -m train --config "$repo/$config" --workdir "$workdir" \
  --config.distributed.enabled=True "$@"
