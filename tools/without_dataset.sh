#!/usr/bin/env bash
# Run a command as on a fresh machine without Debian's dataset-fashion-mnist: where this machine has
# /usr/share/datasets/fashion-mnist, an empty folder is bind-mounted over it in a private mount namespace (needs
# root) for the command only. Used by .ci/run and tools/repeat_tests.sh.   bash tools/without_dataset.sh make test
set -euo pipefail
fmnist=/usr/share/datasets/fashion-mnist
if [ ! -d "$fmnist" ]; then
  exec "$@"
fi
empty=$(mktemp -d)
trap 'rmdir "$empty"' EXIT
unshare -m sh -c 'mount --bind "$1" "$2" && test -z "$(ls -A "$2")" && shift 2 && exec "$@"' sh "$empty" "$fmnist" "$@"
