#!/usr/bin/env bash
# The tiny end-to-end pipeline on CPU, each stage starting from the previous one's checkpoint:
#
#   pre-train (experiments/tiny_dense.py) -> SFT (tiny_sft.py) -> reward model (tiny_rm.py)
#   -> PPO (tiny_ppo.py), and DPO (tiny_dpo.py) from the same SFT model,
#
# then a table of accuracy on held-out generated questions (sums, products, capitals, ...) and
# mean reward-model score, before and after each stage (train/posttrain/task_eval.py).
#
#   scripts/tiny_pipeline.sh [WORKDIR]            # default /tmp/meshlm_tiny_pipeline
#
# Environment: PYTHON (default: python), COMMON (extra --config.* flags given to every stage,
# e.g. a smaller model), PRETRAIN_STEPS, SFT_STEPS, RM_STEPS, PPO_STEPS, DPO_STEPS (override
# the configs' train.steps), EVAL_NUM (held-out questions, default 256). A stage whose workdir
# already holds its final checkpoint is skipped by the train loops (they resume); delete
# WORKDIR to start over. Stages run through `python -m train.posttrain` so that every workdir
# gets a config.json (pre-training there is the plain train loop, as `python -m train`).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-/tmp/meshlm_tiny_pipeline}
PY=${PYTHON:-python}
read -r -a COMMON_FLAGS <<< "${COMMON:-}"
steps() { if [ -n "${1:-}" ]; then echo "--config.train.steps=$1"; fi; }
stage() {  # stage NAME CONFIG STEPS [flags...]
  local name=$1 config=$2 n=$3
  shift 3
  echo "=== $name: $config -> $W/$name" >&2
  $PY -m train.posttrain --config "experiments/$config" --workdir "$W/$name" \
      "${COMMON_FLAGS[@]}" $(steps "$n") "$@"
}
stage pretrain tiny_dense.py "${PRETRAIN_STEPS:-}"
stage sft tiny_sft.py "${SFT_STEPS:-}" --config.train.init_from="$W/pretrain"
stage rm tiny_rm.py "${RM_STEPS:-}" --config.train.init_from="$W/sft"
stage ppo tiny_ppo.py "${PPO_STEPS:-}" --config.train.init_from="$W/sft" \
    --config.ppo.reward_model="$W/rm"
stage dpo tiny_dpo.py "${DPO_STEPS:-}" --config.train.init_from="$W/sft"
echo "=== before / after on held-out questions" >&2
$PY -m train.posttrain.task_eval --run pretrain="$W/pretrain" --run sft="$W/sft" \
    --run ppo="$W/ppo" --run dpo="$W/dpo" --reward_model "$W/rm" --num "${EVAL_NUM:-256}" \
    --out "$W/results.json"
