#!/usr/bin/env bash
# cpc-eval figure1 on a labelled folder of real images: the Fashion-MNIST subset shipped in tests/data written as
# PNG files (train/<class>/, test/<class>/), the bundled checkpoint, shots per class, the test split once.
# The fine-tuned arm is left out (about 10 CPU-ms per image seen: it alone would take longer than the rest).
set -euo pipefail
PY=${PY:-python}
FOLDER=${FOLDER:-/tmp/fmnist-folder}
[ -d "$FOLDER/train" ] || $PY -m benchmarks.fmnist_folder "$FOLDER"
$PY -m cpc_models.evaluate figure1 --checkpoint cpcv2_resnet_tiny.fmnist --data "$FOLDER" --shots 1,5,10,50 \
    --arms pixels_linear,pixels_knn,random_linear,cpc_linear,cpc_grid_linear,cpc_knn,cpc_frozen,supervised \
    --round-images 1000 --split test --threads 2 --no-progress --out "${OUT:-results/own_data}" "$@"
