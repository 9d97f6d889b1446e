#!/usr/bin/env bash
# The CUDA benchmark run of cpc-models, about 8 minutes on one H200 (docs/benchmarks.md).
#
#   bash benchmarks/gpu_run.sh                    # writes cuda.json, cuda.md, cuda_log.txt into $OUT (default: a new
#                                                 # runs/benchmarks/cuda-<UTC time>/); extra arguments go to
#                                                 # benchmarks.run
#   bash benchmarks/gpu_run.sh --update-results   # into benchmarks/results/, the committed tables the docs quote
#
# The interpreter: $PYTHON if set, else the project's .venv/bin/python (make install), else python3; it needs torch
# with CUDA, timm, safetensors, huggingface_hub and tqdm. Run it from anywhere; it works in the repository root.
#
# Order of the work (benchmarks/run.py PRESETS['cuda']): ResNet-161 (the >= 40% MFU target) and
# ResNet-50 first, then the naive baselines and the profile of one R-161 step, then R-101, small, tiny, and
# torch.compile last. Work not started within --time-budget seconds is skipped and listed as skipped; the JSON
# and Markdown are rewritten after every row, so a run cut short still returns what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
if ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "gpu_run.sh: error: $PY cannot import torch; run 'make install' (creates .venv) or set PYTHON to an" \
       "interpreter that has torch: PYTHON=/path/to/python3 bash benchmarks/gpu_run.sh" >&2
  exit 2
fi
UPDATE=0 ARGS=()
for arg in "$@"; do if [ "$arg" = "--update-results" ]; then UPDATE=1; else ARGS+=("$arg"); fi; done
if [ "$UPDATE" = 1 ]; then OUT=benchmarks/results; else OUT="${OUT:-runs/benchmarks/cuda-$(date -u +%Y%m%d-%H%M%S)}"; fi
mkdir -p "$OUT"
echo "gpu_run.sh: $PY, writing $OUT/cuda.json, cuda.md, cuda_log.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv || true
  "$PY" -c "import torch, timm, torchvision; print('torch', torch.__version__, 'timm', timm.__version__, \
'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/cuda_log.txt"
# 400 s of planned work (compile rows only start with >= 150 s left); the hard stop at 500 s leaves the call's
# remaining seconds for the start-up and the copy back.
timeout -s INT 500 "$PY" -m benchmarks.run --device cuda --out "$OUT" --time-budget 400 "${ARGS[@]}" 2>&1 \
  | grep -v '^USDT' | tee -a "$OUT/cuda_log.txt"
rc=${PIPESTATUS[0]}
echo "benchmarks.run exit status $rc" | tee -a "$OUT/cuda_log.txt"
tail -n 60 "$OUT/cuda.md" 2>/dev/null
exit "$rc"
