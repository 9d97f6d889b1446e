#!/usr/bin/env bash
# `make test` N times in a row (default 5) in a fresh clone of HEAD, with the Fashion-MNIST dataset hidden as in
# .ci/run (needs root for the private mount namespace): any flaky test shows up as a failed run.
#   bash tools/repeat_tests.sh [N] [CLONE_DIR]
set -uo pipefail
n=${1:-5}
clone=${2:-$(mktemp -d)/cpc-models}
git clone -q "$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)" "$clone" || exit 1
cd "$clone"
failed=0
echo "commit $(git rev-parse --short HEAD), $(nproc) cores, clone $clone"
for i in $(seq "$n"); do
  start=$(date +%s)
  bash tools/without_dataset.sh make test > "test_run_$i.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || failed=$((failed + 1))
  echo "run $i: exit $rc, $(( $(date +%s) - start )) s wall: $(grep -E '(passed|failed)' "test_run_$i.log" | tail -n 1)"
done
echo "$failed of $n runs failed"
[ $failed -eq 0 ]
