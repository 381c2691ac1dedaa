#!/usr/bin/env bash
# The tiny end-to-end pipeline on CPU, each stage starting from the previous one's checkpoint:
#
#   pre-train (experiments/tiny_dense.py) -> SFT (tiny_sft.py) -> on-policy preference pairs
#   (train.posttrain.preferences: SFT samples rated by the task's checker) -> reward model on
#   them (tiny_rm.py) -> PPO (tiny_ppo.py); DPO (tiny_dpo.py) on the same pairs; GRPO
#   (tiny_grpo.py) with the checker as reward; all from the same SFT model,
#
# then a table of accuracy on held-out generated questions (sums, products, capitals, ...),
# mean reward-model score and the reward model's held-out pair accuracy per task family
# (train/posttrain/task_eval.py).
#
#   scripts/tiny_pipeline.sh [WORKDIR]            # default /tmp/meshlm_tiny_pipeline
#
# Environment: PYTHON (default: python), SEED (train.seed of every stage and the pairs' sampling
# seed, default 0), COMMON (extra --config.* flags given to every stage, e.g. a smaller model),
# PRETRAIN_STEPS, SFT_STEPS, RM_STEPS, PPO_STEPS, DPO_STEPS, GRPO_STEPS (override the configs'
# train.steps), PAIR_PROMPTS (prompts sampled for pairs, default 0: all), RATER (the pairs'
# --rater, default embedded), EVAL_NUM (held-out questions, default 256). A stage whose workdir
# already holds its final checkpoint is skipped by the train loops (they resume); delete
# WORKDIR to start over. Stages run through `python -m train.posttrain` so that every workdir
# gets a config.json (pre-training there is the plain train loop, as `python -m train`).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-/tmp/meshlm_tiny_pipeline}
PY=${PYTHON:-python}
SEED=${SEED:-0}
read -r -a COMMON_FLAGS <<< "${COMMON:-} --config.train.seed=$SEED"
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
if [ ! -s "$W/pairs.jsonl" ]; then
  echo "=== on-policy pairs: SFT samples rated by the checker -> $W/pairs.jsonl" >&2
  $PY -m train.posttrain.preferences --policy "$W/sft" --out "$W/pairs.jsonl.tmp" \
      --rater "${RATER:-embedded}" --samples 8 --temperature 0.7 --num_prompts "${PAIR_PROMPTS:-0}" \
      --seed "$SEED"
  mv "$W/pairs.jsonl.tmp" "$W/pairs.jsonl"
fi
PAIRS=(--config.data.source=onpolicy "--config.data.sources.onpolicy={'kind': 'jsonl', \
'format': 'preference', 'path': '$W/pairs.jsonl', 'eval_fraction': 0.05}")
stage rm tiny_rm.py "${RM_STEPS:-}" --config.train.init_from="$W/sft" "${PAIRS[@]}"
stage ppo tiny_ppo.py "${PPO_STEPS:-}" --config.train.init_from="$W/sft" \
    --config.ppo.reward_model="$W/rm"
stage dpo tiny_dpo.py "${DPO_STEPS:-}" --config.train.init_from="$W/sft" "${PAIRS[@]}"
stage grpo tiny_grpo.py "${GRPO_STEPS:-}" --config.train.init_from="$W/sft"
echo "=== before / after on held-out questions" >&2
$PY -m train.posttrain.task_eval --run pretrain="$W/pretrain" --run sft="$W/sft" \
    --run ppo="$W/ppo" --run dpo="$W/dpo" --run grpo="$W/grpo" --reward_model "$W/rm" \
    --num "${EVAL_NUM:-256}" --out "$W/results.json"
