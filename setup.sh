#!/usr/bin/env bash
# Installs winoq and everything its tests and demo need on a fresh machine.
# torch comes first and pinned to the CPU wheel, so no later requirement pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[test,diffusion]"
# the compiled kernel="cpu" (C++ / ninja, JIT-built into ~/.cache/winoq/ext, or $WINOQ_EXT_DIR): build it now,
# so that the first quantized model does not wait for the compiler; without g++ it warns and winoq still works
echo "setup: building the compiled cpu kernel (a few minutes on 2 cores)"
$PY -c "from winoq.kernels import cpu; import sys; sys.exit(0 if cpu.available() else 1)" \
  && echo "setup: cpu kernel built ($($PY -c 'from winoq.kernels import cpu; print(cpu.isa())'))" \
  || echo "setup: the cpu kernel could not be built; kernel='cpu' will run its PyTorch twin (same results, slower)"
$PY -c "from winoq.kernels import int_step; import sys; sys.exit(0 if int_step.available() else 1)" \
  && echo "setup: integer Winograd step built ($($PY -c 'from winoq.kernels import int_step; print(int_step.isa())'))" \
  || echo "setup: the integer Winograd step could not be built; integer-only models run it in PyTorch (same results, slower)"
$PY -c "from winoq.kernels import int_graph; import sys; sys.exit(0 if int_graph.available() else 1)" \
  && echo "setup: integer-graph kernels built ($($PY -c 'from winoq.kernels import int_graph; print(int_graph.isa())'))" \
  || echo "setup: the integer-graph kernels could not be built; integer-only models run in PyTorch (same results, slower)"
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
