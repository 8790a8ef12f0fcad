"""Loads the compiled kernels, which registers the ``torch.ops.fusedloss`` ops.

The ahead-of-time build (``pip install --no-build-isolation .``) provides
``fusedloss._C``. Without it (e.g. running from a source checkout) the same
sources are JIT-compiled once with ninja into a per-torch-version cache.
"""
import os
import warnings

import torch

from . import _build_config

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check_build_info():
    """Refuse a prebuilt extension built against another torch or CUDA than the
    installed torch's: C++ ABI and CUDA runtime must match."""
    try:
        from . import _build_info
    except ImportError:
        return
    rebuild = "rebuild with `pip install --no-build-isolation -e .` (or `bash scripts/install.sh`)"
    if _build_info.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"fusedloss._C was built against torch {_build_info.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed; {rebuild}"
        )
    # A CPU-only build (CUDA_VERSION None) works with any CUDA build of that torch.
    if _build_info.CUDA_VERSION is not None and _build_info.CUDA_VERSION != torch.version.cuda:
        raise ImportError(
            f"fusedloss._C's CUDA kernels were built against CUDA {_build_info.CUDA_VERSION} but the "
            f"installed torch has torch.version.cuda == {torch.version.cuda!r}; {rebuild}"
        )


def _jit_build():
    from torch.utils.cpp_extension import CUDA_HOME, load

    with_cuda = _build_config.want_cuda(torch.version.cuda, CUDA_HOME)
    # load() turns this variable into nvcc's -gencode flags.
    os.environ[_build_config.CUDA_ARCH_ENV] = _build_config.cuda_archs()
    tag = f"torch{torch.__version__.replace('+', '_')}_{'cuda' if with_cuda else 'cpu'}"
    build_dir = os.environ.get(
        "FUSEDLOSS_JIT_DIR", os.path.join(os.path.expanduser("~"), ".cache", "fusedloss", tag)
    )
    os.makedirs(build_dir, exist_ok=True)
    warnings.warn(f"fusedloss._C not found; JIT-compiling the kernels into {build_dir} (one-time)")
    args = _build_config.compile_args(with_cuda)
    return load(
        name="fusedloss_C",
        sources=_build_config.sources(_ROOT, with_cuda),
        extra_include_paths=_build_config.include_dirs(_ROOT, with_cuda),
        extra_cflags=args["cxx"],
        extra_cuda_cflags=args.get("nvcc"),
        extra_ldflags=_build_config.link_args(),
        with_cuda=with_cuda,
        build_directory=build_dir,
    )


def _load():
    try:
        from . import _C
    except ImportError:
        if not os.path.isdir(os.path.join(_ROOT, "csrc")):
            raise
        return _jit_build()
    _check_build_info()
    return _C


C = _load()


def built_with_cuda():
    """True when the loaded extension contains the CUDA kernels."""
    return bool(C.built_with_cuda())
