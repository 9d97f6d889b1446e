#!/usr/bin/env bash
# The CUDA measurement of cpc-models in one device call of at most 8 minutes (docs/benchmarks.md, issue 26):
# this tree's training step against a base revision (default 062290c, the commit before the fused norm), each change
# on and off, MFU against the datasheet and the measured matmul peak, img/s, peak memory, the largest batch that fits
# 80 GB with and without checkpointing, the top 15 kernels (benchmarks/gpu_bench.py says what and in which order).
#
#   bash benchmarks/gpu_run.sh --prepare [REV]   # here, with git: the base revision's cpc_models into runs/gpu_base/
#                                                 # (git-ignored; carry it to the device machine)
#   bash benchmarks/gpu_run.sh                    # on the GPU: cuda.json, cuda.md, cuda_log.txt into $OUT (default: a
#                                                 # new runs/benchmarks/cuda-<UTC time>/), rewritten after every row
#   bash benchmarks/gpu_run.sh --update-results   # the same into benchmarks/results/ (the committed tables)
#   bash benchmarks/gpu_run.sh --dry              # every code path on the CPU with tiny models (~1-2 min): not a
#                                                 # measurement; tests/test_benchmarks.py runs it
#
# On the device tool: run(command="bash benchmarks/gpu_run.sh", carry=["runs/gpu_base"], timeout_s=540); the files
# come back from $OUT. Without runs/gpu_base (and no git to make it) the base is this tree itself, and the tables
# say so. The interpreter: $PYTHON if set, else the project's .venv/bin/python (make install), else python3.
set -uo pipefail
cd "$(dirname "$0")/.."
BASE_DIR=runs/gpu_base
if [ "${1:-}" = "--prepare" ]; then
  rev="${2:-062290c}"
  rm -rf "$BASE_DIR" && mkdir -p "$BASE_DIR" || exit 1
  if ! git archive "$rev" cpc_models | tar -x -C "$BASE_DIR"; then
    echo "gpu_run.sh: error: cannot archive revision $rev (a shallow clone? fetch it first)" >&2
    exit 2
  fi
  git rev-parse --short "$rev" > "$BASE_DIR/REVISION"
  echo "gpu_run.sh: $BASE_DIR holds cpc_models of $(cat "$BASE_DIR/REVISION") ($(du -sh "$BASE_DIR" | cut -f1))"
  exit 0
fi
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
if ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "gpu_run.sh: error: $PY cannot import torch; run 'make install' (creates .venv) or set PYTHON to an" \
       "interpreter that has torch: PYTHON=/path/to/python3 bash benchmarks/gpu_run.sh" >&2
  exit 2
fi
UPDATE=0 DRY=0 ARGS=()
for arg in "$@"; do
  case "$arg" in
    --update-results) UPDATE=1 ;;
    --dry) DRY=1; ARGS+=("--dry") ;;
    *) ARGS+=("$arg") ;;
  esac
done
if [ "$UPDATE" = 1 ]; then OUT=benchmarks/results; else OUT="${OUT:-runs/benchmarks/cuda-$(date -u +%Y%m%d-%H%M%S)}"; fi
mkdir -p "$OUT"
if [ ! -f "$BASE_DIR/cpc_models/__init__.py" ] && git rev-parse --git-dir >/dev/null 2>&1; then
  bash "$0" --prepare >/dev/null 2>&1 || true
fi
if [ -f "$BASE_DIR/cpc_models/__init__.py" ]; then
  BASE="$BASE_DIR" REV="$(cat "$BASE_DIR/REVISION" 2>/dev/null || echo unknown)"
else
  BASE=self REV="self (no $BASE_DIR: run 'bash benchmarks/gpu_run.sh --prepare' where git is, and carry it)"
  echo "gpu_run.sh: warning: $BASE_DIR is missing; the base side is this tree" >&2
fi
echo "gpu_run.sh: $PY, base $REV, writing $OUT/cuda.json, cuda.md, cuda_log.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
{
  date -u
  if [ "$DRY" = 0 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv || true
  fi
  "$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/cuda_log.txt"
# 380 s of planned work; the hard stop at 450 s (SIGINT: the rows measured so far are already written) leaves the
# call's 8 minutes for the start-up and the copy back.
timeout -s INT 450 "$PY" -m benchmarks.gpu_bench --base "$BASE" --base-rev "$REV" --out "$OUT" --time-budget 380 \
  "${ARGS[@]}" 2>&1 | grep -v '^USDT' | tee -a "$OUT/cuda_log.txt"
rc=${PIPESTATUS[0]}
echo "gpu_bench exit status $rc" | tee -a "$OUT/cuda_log.txt"
cat "$OUT/cuda.md" 2>/dev/null
exit "$rc"
