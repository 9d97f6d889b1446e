#!/usr/bin/env bash
# timm's own model tests on every registered cpc model: tests/test_models.py from the sdist of the *installed* timm
# version (downloaded from PyPI), with `import cpc_models` added to its conftest, run with -k "cpcv1 or cpcv2".
#
#   bash tests/timm_suite.sh [pytest args]          (or: make timm-tests)
#
# PY selects the interpreter (default .venv/bin/python); TIMM_SUITE_DIR keeps the download (default: a temp dir).
# TIMEOUT is timm's per-test limit in seconds (its default, 120, times R-161 on a loaded CPU; speed is not tested here).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PY=$("$PY" -c 'import sys; print(sys.executable)')  # absolute: the tests run from the sdist folder
version=$("$PY" -c 'import timm; print(timm.__version__)')
if [ -n "${TIMM_SUITE_DIR:-}" ]; then
  work=$TIMM_SUITE_DIR
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi
if [ ! -f "$work/timm-$version.tar.gz" ]; then
  "$PY" -m pip download "timm==$version" --no-binary :all: --no-deps -q -d "$work"
fi
rm -rf "$work/timm-$version"
tar xzf "$work/timm-$version.tar.gz" -C "$work"
src="$work/timm-$version"
rm -rf "$src/timm"  # test the installed timm, not the sdist's copy (pytest puts the sdist root on sys.path)
printf '\nimport cpc_models  # noqa: E402,F401  (registers the cpcv1_* / cpcv2_* architectures with timm)\n' \
  >> "$src/tests/conftest.py"
echo "timm $version: tests/test_models.py -k 'cpcv1 or cpcv2' ($src)"
cd "$src"
TIMEOUT=${TIMEOUT:-600} "$PY" -m pytest tests/test_models.py -k "cpcv1 or cpcv2" -p no:cacheprovider -q "$@"
