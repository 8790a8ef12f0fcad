#!/usr/bin/env bash
# Creates .venv (if missing) and builds fusedloss into it from source.
# Used by both README commands (.ci/run and benchmarks/run), so a fresh machine
# needs nothing else. CUDA kernels are compiled whenever nvcc exists, GPU or not.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel
# torch 2.14.1 is a CUDA 13.0 build; it runs on the CPU when no GPU is present.
python -m pip install -q "torch==2.14.1" numpy pytest ninja pybind11 matplotlib

NVCC=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
if [ -x "$NVCC" ] && [ "${FUSEDLOSS_CPU_ONLY:-0}" != "1" ]; then
  export CUDA_HOME=$(dirname "$(dirname "$NVCC")")
  export FUSEDLOSS_FORCE_CUDA=1
  # The archs: TORCH_CUDA_ARCH_LIST, else fusedloss/_build_config.py's default.
  ARCHS=$(cd fusedloss && python -c 'import _build_config; print(_build_config.cuda_archs())')
  echo "fusedloss: building CPU + CUDA kernels (arch $ARCHS, $NVCC)"
else
  export FUSEDLOSS_CPU_ONLY=1
  echo "fusedloss: no nvcc found, building the CPU kernels only"
fi
export MAX_JOBS=${MAX_JOBS:-2}
python -m pip install -q --no-build-isolation -e .
python -c "import fusedloss; print('fusedloss', fusedloss.__version__, 'cuda kernels:', fusedloss.built_with_cuda())"
