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
    try:
        from . import _build_info
    except ImportError:
        return
    if _build_info.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"fusedloss._C was built against torch {_build_info.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed; rebuild with `pip install --no-build-isolation -e .`"
        )


def _jit_build():
    from torch.utils.cpp_extension import CUDA_HOME, load

    with_cuda = _build_config.want_cuda(torch.version.cuda, CUDA_HOME)
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
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
        extra_include_paths=_build_config.include_dirs(_ROOT)
        + (_build_config.cuda_library_include_dirs() if with_cuda else []),
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
