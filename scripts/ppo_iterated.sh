#!/usr/bin/env bash
# PPO with iterated on-policy reward models and a worst-case ensemble, on CPU (tiny model):
#
#   pre-train -> SFT (as scripts/tiny_pipeline.sh) -> every pair of 8 SFT samples a prompt, rated
#   by the checker -> RM 0 -> PPO 1 -> pairs from PPO 1, added -> RM 1 -> PPO 2 -> pairs from PPO
#   2, added -> three RMs on all the pairs (seeds differ) -> PPO with their ensemble (each member
#   standardised on the SFT policy's replies, scored by the minimum) -> held-out accuracy
#   (train/posttrain/task_eval.py) of SFT and the three PPO policies.
#
#   scripts/ppo_iterated.sh [WORKDIR]            # default /tmp/meshlm_ppo_iterated
#
# Environment: PYTHON (default: python), SEED (train.seed of pre-training, SFT and the first RM of
# each round; the pairs are sampled with seeds 3*SEED, 3*SEED+1, 3*SEED+2 and the ensemble's other
# two RMs train with those last two; default 0), PAIR_PROMPTS (prompts sampled for each round of
# pairs, default 6000), PPO_ITERS (iterations of the last PPO, default 150), PPO_BATCH (its
# prompts an iteration, default 128), EVAL_NUM (held-out questions, default 256). Every stage
# whose workdir holds its final checkpoint, and every pair file that exists, is skipped, so the
# script resumes. Results and the recipe's history: benchmarks/results/posttrain_pipeline.md.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-/tmp/meshlm_ppo_iterated}
PY=${PYTHON:-python}
SEED=${SEED:-0}
ITERS=${PPO_ITERS:-150}
COMMON=(--config.train.progress=False)

stage() {  # stage NAME CONFIG SEED [flags...]
  local name=$1 config=$2 seed=$3
  shift 3
  echo "=== $(date -u +%H:%M:%S) $name: $config -> $W/$name" >&2
  $PY -m train.posttrain --config "experiments/$config" --workdir "$W/$name" "${COMMON[@]}" \
      --config.train.seed="$seed" "$@"
}
pairs() {  # pairs OUT POLICY SEED: every pair of 8 replies a prompt whose checker scores differ
  if [ ! -s "$1" ]; then
    echo "=== $(date -u +%H:%M:%S) pairs: $2 -> $1" >&2
    $PY -m train.posttrain.preferences --policy "$2" --out "$1.tmp" --rater embedded --samples 8 \
        --temperature 0.7 --num_prompts "${PAIR_PROMPTS:-6000}" --seed "$3" --all_pairs
    mv "$1.tmp" "$1"
  fi
}
rm_stage() {  # rm_stage NAME PAIRS SEED STEPS
  stage "$1" tiny_rm.py "$3" --config.train.init_from="$W/sft" --config.optim.peak_lr=1e-4 \
      --config.train.steps="$4" --config.train.ckpt_every="$4" --config.data.source=onpolicy \
      "--config.data.sources.onpolicy={'kind': 'jsonl', 'format': 'preference', 'path': '$2', \
'eval_fraction': 0.05}"
}
s1=$((3 * SEED + 1)) s2=$((3 * SEED + 2))

stage pretrain tiny_dense.py "$SEED"
stage sft tiny_sft.py "$SEED" --config.train.init_from="$W/pretrain"
pairs "$W/pairs_0.jsonl" "$W/sft" $((3 * SEED))
rm_stage rm_0 "$W/pairs_0.jsonl" "$SEED" 300
stage ppo_1 tiny_ppo.py "$SEED" --config.train.init_from="$W/sft" \
    --config.ppo.reward_model="$W/rm_0" --config.ppo.kl_coef=0.2
pairs "$W/pairs_ppo1.jsonl" "$W/ppo_1" "$s1"
[ -s "$W/pairs_1.jsonl" ] || cat "$W/pairs_0.jsonl" "$W/pairs_ppo1.jsonl" > "$W/pairs_1.jsonl"
rm_stage rm_1 "$W/pairs_1.jsonl" "$SEED" 500
stage ppo_2 tiny_ppo.py "$SEED" --config.train.init_from="$W/sft" \
    --config.ppo.reward_model="$W/rm_1" --config.ppo.kl_coef=0.2 --config.ppo.lam=1.0 \
    --config.train.steps=120
pairs "$W/pairs_ppo2.jsonl" "$W/ppo_2" "$s2"
[ -s "$W/pairs_2.jsonl" ] || cat "$W/pairs_1.jsonl" "$W/pairs_ppo2.jsonl" > "$W/pairs_2.jsonl"
rm_stage rm_2 "$W/pairs_2.jsonl" "$SEED" 600
rm_stage rm_2_s$s1 "$W/pairs_2.jsonl" "$s1" 600
rm_stage rm_2_s$s2 "$W/pairs_2.jsonl" "$s2" 600
stage ppo tiny_ppo.py "$SEED" --config.train.init_from="$W/sft" \
    --config.ppo.reward_model="$W/rm_2" --config.ppo.reward_ensemble="$W/rm_2_s$s1,$W/rm_2_s$s2" \
    --config.ppo.ensemble_combine=min --config.ppo.kl_coef=0.2 --config.ppo.lam=1.0 \
    --config.train.global_batch="${PPO_BATCH:-128}" --config.train.steps="$ITERS" \
    --config.train.ckpt_every=$((4 * ITERS))
echo "=== $(date -u +%H:%M:%S) before / after on held-out questions" >&2
$PY -m train.posttrain.task_eval --run sft="$W/sft" --run ppo_1="$W/ppo_1" --run ppo_2="$W/ppo_2" \
    --run ppo="$W/ppo" --reward_model "$W/rm_2" --num "${EVAL_NUM:-256}" --out "$W/results.json"
