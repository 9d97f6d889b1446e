#!/usr/bin/env bash
# The CUDA benchmark run of cpc-models, about 8 minutes on one H200 (docs/benchmarks.md).
#
#   bash benchmarks/gpu_run.sh                  # writes $OUT/cuda.json, cuda.md, cuda_log.txt (OUT default:
#                                               # benchmarks/results); extra arguments go to benchmarks.run
#
# Needs torch, timm, safetensors, huggingface_hub and tqdm; run from the repository root, then copy
# $OUT/cuda.{json,md} into benchmarks/results/.
#
# Order of the work (benchmarks/run.py PRESETS['cuda']): ResNet-161 (the >= 40% MFU target) and
# ResNet-50 first, then the naive baselines and the profile of one R-161 step, then R-101, small, tiny, and
# torch.compile last. Work not started within --time-budget seconds is skipped and listed as skipped; the JSON
# and Markdown are rewritten after every row, so a run cut short still returns what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv || true
  "$PY" -c "import torch, timm, torchvision; print('torch', torch.__version__, 'timm', timm.__version__, \
'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/cuda_log.txt"
# 400 s of planned work (compile rows only start with >= 150 s left); the hard stop at 500 s leaves the call's
# remaining seconds for the start-up and the copy back.
timeout -s INT 500 "$PY" -m benchmarks.run --device cuda --out "$OUT" --time-budget 400 "$@" 2>&1 \
  | grep -v '^USDT' | tee -a "$OUT/cuda_log.txt"
rc=${PIPESTATUS[0]}
echo "benchmarks.run exit status $rc" | tee -a "$OUT/cuda_log.txt"
tail -n 60 "$OUT/cuda.md" 2>/dev/null
exit "$rc"
