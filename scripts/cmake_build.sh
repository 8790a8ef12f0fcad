#!/usr/bin/env bash
# C++ developer build with CMake (no setuptools): configures against the torch in
# .venv (run scripts/install.sh first), builds libfusedloss + the C++ numerics
# tests and runs them with ctest. Extra arguments go to cmake, e.g.
#   bash scripts/cmake_build.sh -DFUSEDLOSS_WITH_CUDA=ON
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
TORCH_PREFIX=$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')
NV=$($PY -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
CUDA_ROOT=${CUDA_HOME:-/usr/local/cuda}
# torch's CMake config insists on finding CUDA for a CUDA build of torch, even
# for CPU-only targets; point it at the toolkit and at the nvidia wheels' headers
# and libraries, and pin the arch so it does not probe for a (missing) GPU.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
cmake -S . -B build-cmake \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
  -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT" \
  -DCMAKE_CUDA_COMPILER="$CUDA_ROOT/bin/nvcc" \
  -DCUDA_INCLUDE_DIRS="$CUDA_ROOT/include;$NV/include" \
  -DCUDA_CUDART_LIBRARY="$CUDA_ROOT/lib64/libcudart.so" \
  -DCUDA_nvrtc_LIBRARY="$(ls "$NV"/lib/libnvrtc.so* | head -1)" \
  "$@"
cmake --build build-cmake -j"${MAX_JOBS:-2}"
ctest --test-dir build-cmake --output-on-failure
