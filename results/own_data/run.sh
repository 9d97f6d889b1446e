#!/usr/bin/env bash
# cpc-eval figure1 on a labelled folder of real images: the Fashion-MNIST subset shipped in tests/data written as
# PNG files (train/<class>/, test/<class>/), the bundled checkpoint standing in for step 1 of the README's "Evaluate
# on your own data", then its step 2 as written there: every default arm, shots per class, the test split once.
set -euo pipefail
PY=${PY:-python}
FOLDER=${FOLDER:-/tmp/fmnist-folder}
[ -d "$FOLDER/train" ] || $PY -m benchmarks.fmnist_folder "$FOLDER"
$PY -m cpc_models.evaluate figure1 --checkpoint cpcv2_resnet_tiny.fmnist --data "$FOLDER" --shots 1,5,10,50 \
    --split test --threads 2 --no-progress --out "${OUT:-results/own_data}" "$@"
