#!/bin/bash
# Unrolled (scan_layers=False) reduced-depth compiles at full width, to get per-layer FLOPs
# from cost_analysis (which counts a while-loop body once). Run sequentially.
cd /work/maxtext
for L in 2 4; do
  ./run_A.sh A_ga1_unroll_L$L 1 scan_layers=False base_num_decoder_layers=$L > logs/A_ga1_unroll_L$L.log 2>&1
done
for L in 2 4; do
  ./run_B.sh B_unroll_L$L scan_layers=False base_num_decoder_layers=$L override_model_config=True > logs/B_unroll_L$L.log 2>&1
done
