#!/usr/bin/env bash
# C++ developer build with CMake (no setuptools): configures against the torch in
# .venv (run scripts/install.sh first), builds libfusedloss + the C++ numerics
# tests and runs them with ctest. Sources, flags, include dirs and CUDA archs
# come from fusedloss/_build_config.py, as for setup.py. Extra arguments go to
# cmake, e.g.
#   bash scripts/cmake_build.sh -DFUSEDLOSS_WITH_CUDA=ON
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$PWD/.venv/bin/python
CUDA_ROOT=${CUDA_HOME:-/usr/local/cuda}
# torch's CMake config insists on finding CUDA for a CUDA build of torch, even
# for CPU-only targets: point it at the toolkit (an `nvcc` shim on PATH would
# make it guess /usr/local).
cmake -S . -B build-cmake \
  -DCMAKE_PREFIX_PATH="$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
  -DPython3_EXECUTABLE="$PY" \
  -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT" \
  -DCMAKE_CUDA_COMPILER="$CUDA_ROOT/bin/nvcc" \
  "$@"
cmake --build build-cmake -j"${MAX_JOBS:-2}"
ctest --test-dir build-cmake --output-on-failure
