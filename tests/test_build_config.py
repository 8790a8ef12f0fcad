"""setup.py, the JIT fallback and CMake build the same thing: the sources,
flags, include dirs and CUDA archs of fusedloss/_build_config.py. Nothing is
compiled here."""
import importlib.util
import os
import re
import subprocess
import sys
import types

import pytest
import torch
from torch.utils import cpp_extension

import fusedloss
from fusedloss import _build_config, _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH_ENV = _build_config.CUDA_ARCH_ENV


def set_env(monkeypatch, name, value):
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)


def setup_py_extension():
    """setup.py's Extension; imported under another name, so nothing is built."""
    spec = importlib.util.spec_from_file_location("fusedloss_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ext


def jit_load_kwargs(monkeypatch, tmp_path):
    """What the JIT fallback passes to torch.utils.cpp_extension.load."""
    captured = {}
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: captured.update(kwargs))
    monkeypatch.setenv("FUSEDLOSS_JIT_DIR", str(tmp_path))
    with pytest.warns(UserWarning, match="JIT-compiling"):
        _extension._jit_build()
    return captured


def cmake_vars(with_cuda):
    """The variables CMakeLists.txt gets from `_build_config.py --cmake`."""
    cmd = [sys.executable, os.path.join(ROOT, "fusedloss", "_build_config.py"), "--cmake"]
    out = subprocess.run(cmd + (["--cuda"] if with_cuda else []), check=True, capture_output=True, text=True).stdout
    return {name: value.split(";") if value else [] for name, value in re.findall(r'^set\((\w+) "(.*)"\)$', out, re.M)}


@pytest.mark.parametrize("arch_env", [None, "9.0"])
@pytest.mark.parametrize("with_cuda", [False, True], ids=["cpu", "cuda"])
def test_setup_jit_and_cmake_agree(with_cuda, arch_env, monkeypatch, tmp_path):
    if with_cuda and cpp_extension.CUDA_HOME is None:
        pytest.skip("CUDAExtension needs a CUDA_HOME")
    set_env(monkeypatch, _build_config.FORCE_CUDA_ENV, "1" if with_cuda else None)
    set_env(monkeypatch, _build_config.CPU_ONLY_ENV, None if with_cuda else "1")
    set_env(monkeypatch, "DEBUG", None)
    archs = arch_env or _build_config.DEFAULT_CUDA_ARCHS

    # setup.py and the JIT hand the archs to torch through the environment.
    set_env(monkeypatch, ARCH_ENV, arch_env)
    ext = setup_py_extension()
    assert os.environ[ARCH_ENV] == archs
    set_env(monkeypatch, ARCH_ENV, arch_env)
    jit = jit_load_kwargs(monkeypatch, tmp_path)
    assert os.environ[ARCH_ENV] == archs
    set_env(monkeypatch, ARCH_ENV, arch_env)
    cmake = cmake_vars(with_cuda)
    assert cmake["FUSEDLOSS_CUDA_ARCHS"] == archs.split(";")

    setup_sources = [os.path.join(ROOT, s) for s in ext.sources]
    assert setup_sources == jit["sources"]
    module = os.path.join(ROOT, _build_config.PYTHON_MODULE_SOURCE)
    assert sorted(setup_sources) == sorted(cmake["FUSEDLOSS_SOURCES"] + [module])
    assert any(s.endswith(".cu") for s in setup_sources) == with_cuda

    # CppExtension / CUDAExtension append torch's own include dirs after ours.
    assert ext.include_dirs[: len(jit["extra_include_paths"])] == jit["extra_include_paths"]
    assert jit["extra_include_paths"] == cmake["FUSEDLOSS_INCLUDE_DIRS"]

    assert ext.extra_compile_args["cxx"] == jit["extra_cflags"] == cmake["FUSEDLOSS_CXX_FLAGS"]
    assert ext.extra_compile_args.get("nvcc", []) == (jit["extra_cuda_cflags"] or []) == cmake["FUSEDLOSS_NVCC_FLAGS"]
    assert bool(cmake["FUSEDLOSS_NVCC_FLAGS"]) == with_cuda
    assert ext.extra_link_args == jit["extra_ldflags"] == cmake["FUSEDLOSS_LINK_FLAGS"]
    assert jit["with_cuda"] == with_cuda


def test_no_other_arch_default():
    """The default arch list lives only in _build_config.py (the issue: setup.py,
    the JIT, install.sh and CMakeLists.txt each had their own)."""
    assert _build_config.DEFAULT_CUDA_ARCHS == "8.0;9.0"
    # "9.0", "8.6+PTX" (not "2.14.1" or "13.0"), or CMake's "80 90".
    arch_literal = re.compile(r"(?<![\d.])(?:[5-9]|1[0-2])\.\d(?![\d.])|CMAKE_CUDA_ARCHITECTURES [\d\"]")
    consumers = ["setup.py", "fusedloss/_extension.py", "CMakeLists.txt", "scripts/install.sh",
                 "scripts/cmake_build.sh"]
    for path in consumers:
        with open(os.path.join(ROOT, path)) as f:
            assert not arch_literal.findall(f.read()), path


@pytest.mark.parametrize(
    "built_torch, built_cuda, torch_cuda, error",
    [
        (None, "13.0", "13.0", None),
        (None, "12.8", "13.0", "CUDA 12.8"),
        (None, "13.0", None, "CUDA 13.0"),
        (None, None, "13.0", None),  # CPU-only build: any CUDA
        (None, None, None, None),
        ("0.0.1", None, None, "torch 0.0.1"),
    ],
)
def test_build_info_check(built_torch, built_cuda, torch_cuda, error, monkeypatch):
    info = types.ModuleType("fusedloss._build_info")
    info.TORCH_VERSION = built_torch or torch.__version__
    info.CUDA_VERSION = built_cuda
    monkeypatch.setitem(sys.modules, "fusedloss._build_info", info)
    monkeypatch.setattr(fusedloss, "_build_info", info, raising=False)
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    if error is None:
        _extension._check_build_info()
    else:
        with pytest.raises(ImportError, match=re.escape(error) + ".*pip install --no-build-isolation"):
            _extension._check_build_info()
