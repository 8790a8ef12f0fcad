"""How fusedloss is compiled, in one place: sources, include dirs, C++ / nvcc /
link flags and the default CUDA archs.

Consumers:
- setup.py (ahead-of-time build) loads this file by path, so it must not
  import torch or fusedloss;
- fusedloss/_extension.py (JIT build when no prebuilt extension is importable);
- CMakeLists.txt runs ``python fusedloss/_build_config.py --cmake [--cuda] [--debug]``
  at configure time and includes the ``set(...)`` lines it prints.

Environment knobs (read at build time):
- FUSEDLOSS_CPU_ONLY=1 / FUSEDLOSS_FORCE_CUDA=1: skip / force the CUDA kernels;
- TORCH_CUDA_ARCH_LIST: CUDA archs, default DEFAULT_CUDA_ARCHS;
- FUSEDLOSS_CPU_ARCH: -march of the C++ kernels (see cpu_arch_flags).
"""
import argparse
import glob
import os
import platform
import sys

CPU_ONLY_ENV = "FUSEDLOSS_CPU_ONLY"
FORCE_CUDA_ENV = "FUSEDLOSS_FORCE_CUDA"
CPU_ARCH_ENV = "FUSEDLOSS_CPU_ARCH"
# torch's own knob: read by torch.utils.cpp_extension and by torch's CMake config.
CUDA_ARCH_ENV = "TORCH_CUDA_ARCH_LIST"

# Hopper (H100/H200) is the target and Ampere (A100) must keep working. Set
# explicitly because GPU-less builders (CI) would otherwise get torch's guess.
# Every build path (setup.py, JIT, CMake, scripts/install.sh) uses this list:
# Ampere costs CI only 4-10 s of nvcc per .cu file (measured on 2 cores), too
# little to justify a Hopper-only install.sh build that cannot run on an A100.
DEFAULT_CUDA_ARCHS = "8.0;9.0"

# The pybind11 module fusedloss._C; everything else is the op library, which
# the CMake build links on its own (loadable with torch.ops.load_library).
PYTHON_MODULE_SOURCE = os.path.join("csrc", "module.cpp")


def cuda_archs():
    """The CUDA archs to compile for: TORCH_CUDA_ARCH_LIST, else the default."""
    return os.environ.get(CUDA_ARCH_ENV) or DEFAULT_CUDA_ARCHS


def op_sources(root, with_cuda):
    """C++ (and CUDA) sources of the ops under ``root``/csrc, sorted for
    reproducible builds; the Python module is not among them."""
    csrc = os.path.join(root, "csrc")
    files = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    files.remove(os.path.join(root, PYTHON_MODULE_SOURCE))
    if with_cuda:
        files += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    return files


def sources(root, with_cuda):
    """Sources of the Python extension fusedloss._C."""
    return [os.path.join(root, PYTHON_MODULE_SOURCE)] + op_sources(root, with_cuda)


def include_dirs(root, with_cuda):
    dirs = [os.path.join(root, "csrc", "include"), os.path.join(root, "csrc")]
    if with_cuda:
        dirs += cuda_library_include_dirs()
    return dirs


def cpu_arch_flags():
    """-march for the C++ CPU kernels. Their exp / max / sum loops only
    vectorise 8-wide with AVX2+FMA, so when the build machine has them we target
    x86-64-v3 (Haswell, 2013, and newer). FUSEDLOSS_CPU_ARCH overrides it
    (e.g. "native", or "" for the compiler's default baseline)."""
    arch = os.environ.get(CPU_ARCH_ENV)
    if arch is not None:
        return [f"-march={arch}"] if arch else []
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return []
    return ["-march=x86-64-v3"] if {"avx2", "fma", "bmi2"} <= set(flags) else []


def compile_args(with_cuda, debug=False):
    """{"cxx": C++ flags, "nvcc": CUDA flags (only with CUDA)}."""
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fopenmp: at::parallel_for and `#pragma omp simd` are expanded in our own
    # translation units, so without it the CPU kernels run on one thread.
    # -fno-trapping-math lets the branch-free select loops vectorise; it changes
    # no result (we never rely on floating-point traps).
    cpu = opt + ["-fopenmp", "-fno-trapping-math"] + cpu_arch_flags()
    if not with_cuda:
        return {"cxx": cpu}
    return {
        "cxx": cpu + ["-DFUSEDLOSS_WITH_CUDA"],
        "nvcc": opt + ["-DFUSEDLOSS_WITH_CUDA", "-lineinfo", "--expt-relaxed-constexpr", "--threads=2"],
    }


def link_args():
    return ["-fopenmp"]


def want_cuda(torch_cuda_version, cuda_home):
    """Build CUDA kernels when torch is a CUDA build and a toolkit exists (never
    gated on a visible GPU, so GPU-less builders still compile the kernels).
    A toolkit means nvcc plus the runtime headers: a lone `nvcc` shim on PATH
    makes torch guess CUDA_HOME=/usr/local, which has neither."""
    if os.environ.get(CPU_ONLY_ENV, "0") == "1":
        return False
    if os.environ.get(FORCE_CUDA_ENV, "0") == "1":
        return True
    return (
        torch_cuda_version is not None
        and cuda_home is not None
        and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
        and os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime.h"))
    )


def cuda_library_include_dirs():
    """Include dirs of the CUDA math libraries shipped as pip wheels
    (nvidia/cu13/include: cublas_v2.h, cusparse.h), which ATen's CUDA headers
    include but a bare toolkit install may lack."""
    import site
    import sysconfig

    roots = [sysconfig.get_paths()["purelib"]] + site.getsitepackages()
    found = []
    for root in roots:
        for inc in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            if os.path.exists(os.path.join(inc, "cublas_v2.h")) and inc not in found:
                found.append(inc)
    return found


def cuda_library_nvrtc():
    """libnvrtc.so.N of the CUDA wheels ("" if absent), for CMake only:
    torch's CMake config links libnvrtc, which a bare toolkit may lack."""
    for inc in cuda_library_include_dirs():
        found = sorted(glob.glob(os.path.join(os.path.dirname(inc), "lib", "libnvrtc.so.*")))
        if found:
            return found[0]
    return ""


def cmake_config(root, with_cuda, debug=False):
    """The CMake variables CMakeLists.txt builds from, as ``{name: list}``."""
    args = compile_args(with_cuda, debug)
    return {
        "FUSEDLOSS_SOURCES": op_sources(root, with_cuda),
        "FUSEDLOSS_INCLUDE_DIRS": include_dirs(root, with_cuda),
        "FUSEDLOSS_CXX_FLAGS": args["cxx"],
        "FUSEDLOSS_NVCC_FLAGS": args.get("nvcc", []),
        "FUSEDLOSS_LINK_FLAGS": link_args(),
        "FUSEDLOSS_CUDA_ARCHS": cuda_archs().replace(";", " ").split(),
        "FUSEDLOSS_NVRTC_LIBRARY": [cuda_library_nvrtc()],
    }


def _cmake_quote(value):
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def main(argv):
    parser = argparse.ArgumentParser(description="Print fusedloss's build configuration.")
    parser.add_argument("--cmake", action="store_true", required=True, help="print set(...) lines for CMake")
    parser.add_argument("--cuda", action="store_true", help="with the CUDA kernels")
    parser.add_argument("--debug", action="store_true", help="debug flags (-O0 -g)")
    args = parser.parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, values in cmake_config(root, args.cuda, args.debug).items():
        print(f"set({name} {_cmake_quote(';'.join(values))})")


if __name__ == "__main__":
    main(sys.argv[1:])
