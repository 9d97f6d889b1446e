#!/usr/bin/env bash
# The GPU pretraining candidates of the search (one H200, torch 2.11, bf16 autocast, four runs sharing the GPU),
# run from the repository root with the Fashion-MNIST IDX files in .fmnist/. Each run was stopped by `timeout`
# (SIGTERM: checkpoint, exit) where it did not finish in the time left, and A, B and F were then resumed with the same
# command (`--resume auto` is the default), which continues exactly. E was not resumed (1,443 of 2,344 steps).
export PYTHONUNBUFFERED=1 PYTHONPATH=.
W512='{"channels": [64, 128, 512], "bottle_widths": [16, 32, 128]}'    # = cpcv2_resnet_tiny_wide
W1024='{"channels": [64, 128, 1024], "bottle_widths": [16, 32, 256]}'
run() { name=$1; shift; python3 -m cpc_models.train --preset fmnist_tiny --data-dir .fmnist --out-dir runs/$name \
  --save-every 500 --keep-last 1 --log-every 100 --progress false "$@"; }
run A_w512_b32_3ep --model_args "$W512" --lr 4e-3 --batch-size 32 --max-steps 5625 &
run B_w512_b128_10ep --model_args "$W512" --lr 4e-3 --batch-size 128 --max-steps 4688 &   # published
run C_w512_b128_6ep_lr6 --model_args "$W512" --lr 6e-3 --batch-size 128 --max-steps 2813 &
run D_w1024_b128_6ep --model_args "$W1024" --lr 4e-3 --batch-size 128 --max-steps 2813 &
wait
run E_w512_b256_10ep --model_args "$W512" --lr 6e-3 --batch-size 256 --max-steps 2344 &
run F_w1024_b256_6ep --model_args "$W1024" --lr 4e-3 --batch-size 256 --max-steps 1407 &
wait
