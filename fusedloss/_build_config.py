"""Sources and compiler flags of the fusedloss extension.

Shared by setup.py (ahead-of-time build) and fusedloss/_extension.py (JIT build
when no prebuilt extension is importable), so both compile the same thing.
This module must not import torch or fusedloss: setup.py loads it by path.
"""
import glob
import os
import platform

CPU_ONLY_ENV = "FUSEDLOSS_CPU_ONLY"
FORCE_CUDA_ENV = "FUSEDLOSS_FORCE_CUDA"


def sources(root, with_cuda):
    """C++ (and CUDA) sources under ``root``/csrc, sorted for reproducible builds."""
    csrc = os.path.join(root, "csrc")
    files = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    if with_cuda:
        files += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    return files


def include_dirs(root):
    return [os.path.join(root, "csrc", "include"), os.path.join(root, "csrc")]


CPU_ARCH_ENV = "FUSEDLOSS_CPU_ARCH"


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
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fopenmp: at::parallel_for and `#pragma omp simd` are expanded in our own
    # translation units, so without it the CPU kernels run on one thread.
    # -fno-trapping-math lets the branch-free select loops vectorise; it changes
    # no result (we never rely on floating-point traps).
    cpu = opt + ["-fopenmp", "-fno-trapping-math"] + cpu_arch_flags()
    cxx = cpu + ["-DFUSEDLOSS_WITH_CUDA"] if with_cuda else cpu
    args = {"cxx": cxx}
    if with_cuda:
        args["nvcc"] = opt + [
            "-DFUSEDLOSS_WITH_CUDA",
            "-lineinfo",
            "--expt-relaxed-constexpr",
            "--threads=2",
        ]
    return args


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
