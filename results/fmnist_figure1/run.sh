#!/usr/bin/env bash
# Figure 1 on the Fashion-MNIST test set for cpcv2_resnet_tiny_wide.fmnist: two lanes of one-thread processes, one per
# core (each about 10 GB of memory), about 3.2 and 3.1 CPU-hours of runs (results/fig1_*/results.json). Every run is
# seeded by (arm, fraction, seed), so how the runs are split over processes changes no result; every command resumes its folder (results/fig1_*). Then one merged table and figure,
# written into the README and the model card. PY=... picks the interpreter (default: python).
# The supervised CNN is the default of cpc-eval (ConvNet 32/64/128, depth 2, picked on val); the depth-1 table it
# replaced is results/fmnist_figure1_depth1.
set -euo pipefail
cd "$(dirname "$0")/../.."
E="${PY:-python} -m cpc_models.evaluate"
A='--checkpoint cpcv2_resnet_tiny_wide.fmnist --split test --threads 1 --progress false'

lane1() {
  $E figure1 $A --out results/fig1_e --arms supervised --fractions 0.01,0.02,0.04,0.05,0.1,0.2
  $E figure1 $A --out results/fig1_e --arms supervised --fractions 0.5 --seeds 0
  $E figure1 $A --out results/fig1_h --arms supervised --fractions 1 --seeds 2
  $E figure1 $A --out results/fig1_a --arms cpc_frozen --arm-fractions '{"cpc_frozen": [0.01, 0.02, 0.04]}'
  $E figure1 $A --out results/fig1_c --arms cpc_frozen --arm-fractions '{"cpc_frozen": [0.05, 0.1, 0.2]}'
}
lane2() {
  $E figure1 $A --out results/fig1_b \
      --arms pixels_linear,pixels_knn,random_linear,random_grid_linear,cpc_linear,cpc_grid_linear,cpc_knn,cpc_finetune \
      --arm-fractions '{"cpc_finetune": [0.01], "cpc_grid_linear": [0.01, 0.02, 0.04, 0.05, 0.1, 0.2], "random_grid_linear": [0.01]}'
  $E figure1 $A --out results/fig1_f --arms supervised --fractions 1 --seeds 0,1
  $E figure1 $A --out results/fig1_g --arms supervised --fractions 0.5 --seeds 1,2
}
lane1 > results/fig1_lane1.log 2>&1 & one=$!
lane2 > results/fig1_lane2.log 2>&1 & two=$!
wait $one && wait $two
$E merge results/fmnist_figure1 results/fig1_e results/fig1_f results/fig1_g results/fig1_h results/fig1_a results/fig1_b \
    results/fig1_c
$E plot results/fmnist_figure1 --readme README.md --card weights/cpcv2_resnet_tiny_wide.fmnist/README.md
