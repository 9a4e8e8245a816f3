#!/usr/bin/env bash
# Installs winoq and everything its tests and demo need on a fresh machine.
# torch comes first and pinned to the CPU wheel, so no later requirement pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[test,diffusion]"
FMNIST=/usr/share/datasets/fashion-mnist
if [ -d "$FMNIST" ]; then
  echo "setup: Fashion-MNIST found at $FMNIST"
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "setup: installing Debian package dataset-fashion-mnist"
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
    || echo "setup: could not install dataset-fashion-mnist; tests that need it will be skipped"
else
  echo "setup: skipping dataset-fashion-mnist (needs apt-get as root); tests that need it will be skipped"
fi
echo "setup: done"
