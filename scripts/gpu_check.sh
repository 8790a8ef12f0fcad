#!/usr/bin/env bash
# The whole GPU check of fusedloss in one command, because GPU time is scarce
# (a 15-minute device budget per session, 1-2 minutes of it per machine start).
#
#   scripts/gpu_check.sh --prepare        here, with network: peers' wheels -> .whl/ (+ .whl/REVISION)
#   scripts/gpu_check.sh --stamp          here: record the git revision in .whl/REVISION (the tree
#                                         travels to the GPU machine without .git)
#   scripts/gpu_check.sh [OUTDIR]         on the GPU machine: build, tests, sanitizers, bench -> OUTDIR
#                                         (default $OUT, the device tool's output folder)
#   scripts/gpu_check.sh --dry-run [OUTDIR]   print the stages and commands, check what can be checked
#   scripts/gpu_check.sh --help
#
# See usage() below for the options and environment knobs, README.md ("GPU
# check") for the device command.  Every stage runs under its own `timeout`
# and the run continues after a failure; the timeouts add up to less than
# 9 minutes so that one device call (at most 10) always ends with the summary.
set -uo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
ROOT="$(cd "$(dirname "$SELF")/.." && pwd)"
cd "$ROOT" || exit 2

# ------------------------------------------------------------------ settings
# Everything configurable comes from the environment so that the stage
# children (this script re-run as `--stage NAME` under `timeout`) see the same
# values as the parent, and so that tests can point the tools at fakes.
WHL_DIR="${GPU_CHECK_WHL_DIR:-$ROOT/.whl}"
PYTHON="${GPU_CHECK_PYTHON:-python3}"              # on the device: the python that holds torch
SANITIZER="${GPU_CHECK_SANITIZER:-compute-sanitizer}"
if ! command -v "$SANITIZER" >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
    SANITIZER=/usr/local/cuda/bin/compute-sanitizer   # the toolkit's, when its bin/ is not on PATH
fi
SITE_DIR="${GPU_CHECK_SITE:-/tmp/site}"            # the carried wheels are installed here, never over torch
ARCHS="${GPU_CHECK_ARCHS:-9.0}"                    # the H200 only: one nvcc pass per file, not two (8.0;9.0)
JOBS="${GPU_CHECK_JOBS:-16}"                       # the H200 machine has 16 cores
PYTEST_WORKERS="${GPU_CHECK_PYTEST_WORKERS:-8}"    # pytest-xdist workers (when importable there)
# The CUDA-parametrized tests (ids with "cuda"): the CPU ones run in CI anyway.
PYTEST_SELECT="${GPU_CHECK_PYTEST_SELECT:--k cuda}"
# torch.compile(reference) costs 20-40 s of compilation per shape: off to fit the budget.
BENCH_ARGS="${GPU_CHECK_BENCH_ARGS:---compile off}"
# Sanitize only our kernels (mangled names contain "fusedloss"): cuBLAS and
# PyTorch's own kernels under racecheck would take minutes.  "" checks all.
SANITIZER_FILTER="${GPU_CHECK_SANITIZER_FILTER-kns=fusedloss}"
SANITIZER_ERROR_RC=86                              # distinguishes "sanitizer found errors" from a crash
FILE_CAP_BYTES=$((15 * 1024 * 1024))               # the device returns files of at most 16 MiB
# Peers raced by fusedloss.bench (fusedloss/bench/variants.py), pinned so that
# every run measures the same code.  torch, triton and numpy are on the device.
WHEELS="${GPU_CHECK_WHEELS:-cut-cross-entropy==25.1.1 liger-kernel==0.8.5 inf-cl==1.2.1}"
# Deliberately not carried (name: reason), recorded in .whl/MISSING.txt.
SKIPPED_WHEELS="quack-kernels: its wheel is small (0.7 MiB) but it needs nvidia-cutlass-dsl, apache-tvm-ffi and torch-c-dlpack-ext (binary, far larger); fusedloss.bench does not race it"

# name timeout(s) log-file; the order is the run order.  Budget (sum 535 s):
# build ~3 min with 16 jobs, tests ~1.5 min, sanitizers ~1.5 min, bench ~2 min.
STAGE_TABLE="
setup              20  build.log     install the carried wheels, record device/torch/CUDA/revision
build             180  build.log     setup.py build_ext --inplace with the device's torch (sm_90)
kernels            25  sanitizer.log every CUDA kernel, small and default shapes, checked against fp64
tests              60  tests.log     the CUDA-parametrized tests
tests_single_pass  25  tests.log     single-pass CUDA tests again with FUSEDLOSS_CUDA_SINGLE_PASS=1
memcheck           40  sanitizer.log compute-sanitizer memcheck on the kernel driver (--small)
racecheck          25  sanitizer.log compute-sanitizer racecheck (shared-memory hazards)
synccheck          15  sanitizer.log compute-sanitizer synccheck (barrier misuse)
initcheck          20  sanitizer.log compute-sanitizer initcheck (uninitialised global reads)
bench_lce          60  bench.log     bench --preset gpu: linear CE vs reference, CCE, Liger, bare GEMMs
bench_sampled      20  bench.log     bench --preset gpu: sampled softmax, NCE at 1M classes
bench_pairs        30  bench.log     bench --preset gpu: InfoNCE (vs inf-cl), NT-Xent, CLIP
bench_report       15  bench.log     merge the bench parts into bench.json, plot bench.png
"
TOTAL_LIMIT=540   # 9 minutes: what the timeouts may add up to
# Wall-clock guard on top of the timeouts (their kill grace and the bookkeeping
# add a little): a stage never runs past this many seconds after the start, so
# the run ends, summary included, inside the device's 600 s command limit.
DEADLINE="${GPU_CHECK_DEADLINE:-570}"
# Files written to OUTDIR (the device returns at most 8, flat names).
OUT_FILES="summary.txt gpu_check.json build.log tests.log sanitizer.log bench.log bench.json bench.png"

stage_names() { awk 'NF {print $1}' <<<"$STAGE_TABLE"; }
stage_field() { awk -v s="$1" -v f="$2" '$1 == s {print $f}' <<<"$STAGE_TABLE"; }
stage_desc() { awk -v s="$1" '$1 == s {$1 = $2 = $3 = ""; sub(/^ +/, ""); print}' <<<"$STAGE_TABLE"; }
# GPU_CHECK_TIMEOUT_<STAGE> (upper case) overrides one stage's timeout.
stage_timeout() {
    local var
    var="GPU_CHECK_TIMEOUT_$(tr '[:lower:]' '[:upper:]' <<<"$1")"
    echo "${!var:-$(stage_field "$1" 2)}"
}

usage() {
    cat <<EOF
usage: scripts/gpu_check.sh [OUTDIR]             run the GPU check, results in OUTDIR (default \$OUT)
       scripts/gpu_check.sh --dry-run [OUTDIR]   print the stages, timeouts and commands; run nothing
       scripts/gpu_check.sh --prepare            download the peers' wheels into .whl/ (needs network)
       scripts/gpu_check.sh --stamp              write the git revision to .whl/REVISION
       scripts/gpu_check.sh --help

Run options:
  --only a,b    run only these stages (e.g. --only bench_lce,bench_report after a build in the same
                warm machine); stages other than setup/build need an importable CUDA build of fusedloss
  --skip a,b    run every stage but these

Stages (timeout in seconds; they add up to $(total_timeout), at most ${TOTAL_LIMIT}; no stage runs past
${DEADLINE} s after the start):
$(for s in $(stage_names); do printf '  %-18s %4ss  %s\n' "$s" "$(stage_timeout "$s")" "$(stage_desc "$s")"; done)

OUTDIR receives at most 8 files: ${OUT_FILES}.
The summary table (stage, status, seconds) is printed last and saved as summary.txt.
Exit status: 0 when every stage passed, 1 when one failed or timed out, 2 on a usage error,
3 when no GPU is visible (the check builds the extension in place: it refuses to run without one).

Environment: GPU_CHECK_PYTHON (python3), GPU_CHECK_SANITIZER (compute-sanitizer), GPU_CHECK_WHL_DIR
(.whl), GPU_CHECK_SITE (/tmp/site), GPU_CHECK_ARCHS (9.0), GPU_CHECK_JOBS (16),
GPU_CHECK_PYTEST_WORKERS (8), GPU_CHECK_PYTEST_SELECT (-k cuda), GPU_CHECK_BENCH_ARGS (--compile off),
GPU_CHECK_SANITIZER_FILTER (kns=fusedloss; empty: every kernel), GPU_CHECK_TIMEOUT_<STAGE>,
GPU_CHECK_REVISION (overrides the recorded revision), GPU_CHECK_ALLOW_NO_GPU=1 (tests only).
--prepare: GPU_CHECK_PIP (the pip command, default .venv/bin/python -m pip), GPU_CHECK_WHEELS
("${WHEELS}").
EOF
}

die_usage() {
    echo "gpu_check.sh: $*" >&2
    echo "try: scripts/gpu_check.sh --help" >&2
    exit 2
}

# Echo a command, then run it unless this is a dry run (one source of truth
# for what the stages do and what --dry-run prints).
run_cmd() {
    local a
    printf '+'
    for a in "$@"; do
        # Inline Python helpers print as a placeholder, not as 40 quoted lines.
        case "$a" in
            *$'\n'*) printf ' <inline python, %d lines>' "$(wc -l <<<"$a")" ;;
            *[!A-Za-z0-9_./=:,@%+-]* | "") printf " '%s'" "${a//\'/\'\\\'\'}" ;;
            *) printf ' %s' "$a" ;;
        esac
    done
    printf '\n'
    [ "${GPU_CHECK_DRY:-0}" = 1 ] && return 0
    "$@"
}

note() { echo "gpu_check: $*"; }

# ------------------------------------------------------------------ revision
# The tree travels to the device without .git: `--stamp` (and `--prepare`)
# record the revision here in .whl/REVISION, which travels with the wheels.
git_revision_here() {
    local rev dirty=""
    rev="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null)" || return 1
    [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ] && dirty="-dirty"
    echo "$rev$dirty"
}

revision() {
    if [ -n "${GPU_CHECK_REVISION:-}" ]; then echo "$GPU_CHECK_REVISION"; return; fi
    if git_revision_here 2>/dev/null; then return; fi
    if [ -f "$WHL_DIR/REVISION" ]; then
        local rev
        rev="$(sed -n 's/^revision=//p' "$WHL_DIR/REVISION" | head -n 1)"
        [ -n "$rev" ] && { echo "$rev (stamped)"; return; }
    fi
    echo "unknown (no .git and no $WHL_DIR/REVISION: run scripts/gpu_check.sh --stamp before the device call)"
}

do_stamp() {
    mkdir -p "$WHL_DIR" || return 1
    local rev
    rev="$(git_revision_here)" || { echo "gpu_check.sh --stamp: not a git checkout" >&2; return 1; }
    {
        echo "revision=$rev"
        echo "describe=$(git -C "$ROOT" describe --always --dirty 2>/dev/null)"
        echo "stamped=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        case "$rev" in
            *-dirty) echo "diff_sha256=$(git -C "$ROOT" diff HEAD | sha256sum | cut -d' ' -f1)" ;;
        esac
    } >"$WHL_DIR/REVISION"
    note "stamped $rev into $WHL_DIR/REVISION"
}

# ------------------------------------------------------------------ --prepare
# Packages the device image already has (KINDS.md, nvidia-h200, 2026-11-17):
# a wheel's requirement on one of them needs nothing carried.
DEVICE_PACKAGES="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet
filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"

# The device's Python: CPython 3.12, x86-64 manylinux (pip matches each tag exactly).
PIP_TARGET_ARGS=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
    --platform manylinux_2_39_x86_64 --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64
    --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
    --platform manylinux1_x86_64)

pip_cmd() {
    # GPU_CHECK_PIP is split into words on purpose ("python -m pip", or a fake in tests).
    if [ -n "${GPU_CHECK_PIP:-}" ]; then echo "$GPU_CHECK_PIP"
    elif [ -x "$ROOT/.venv/bin/python" ]; then echo "$ROOT/.venv/bin/python -m pip"
    else echo "python3 -m pip"; fi
}

# A python to read wheel metadata with (any version: it only unzips).
meta_python() {
    if [ -x "$ROOT/.venv/bin/python" ]; then echo "$ROOT/.venv/bin/python"; else echo python3; fi
}

# Prints the requirements (names) of the wheels given as arguments that apply
# on the device (Python 3.12, Linux x86-64, no extras), one per line.
wheel_requirements() {
    "$(meta_python)" - "$@" <<'EOF'
import re, sys, zipfile
try:
    from packaging.requirements import Requirement
except ImportError:  # pip vendors it
    try:
        from pip._vendor.packaging.requirements import Requirement
    except ImportError:
        Requirement = None
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
for path in sys.argv[1:]:
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode("utf-8", "replace").splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        spec = line.split(":", 1)[1].strip()
        if Requirement is not None:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            name = req.name
        else:
            if "extra ==" in spec:
                continue
            name = re.split(r"[\s;<>=!~\[(]", spec, maxsplit=1)[0]
        print(name)
EOF
}

# "bytes  name" of each wheel in $WHL_DIR.
list_wheels() {
    local f
    for f in "$WHL_DIR"/*.whl; do
        [ -f "$f" ] && printf '%10d  %s\n' "$(stat -c %s "$f")" "$(basename "$f")"
    done
}

normalise() { tr '[:upper:]' '[:lower:]' | sed -E 's/[-_.]+/-/g'; }

# The distribution name of a wheel file, normalised.
wheel_dist() { basename "$1" | cut -d- -f1 | normalise; }

# Download one requirement spec as a wheel for the device into $WHL_DIR,
# replacing older versions of the same distribution (two versions of one
# package stop the device's install).  Returns 1 when no wheel was found.
fetch_wheel() {
    local spec="$1" tmp new f
    tmp="$(mktemp -d)"
    # shellcheck disable=SC2046  # pip_cmd is split into words on purpose
    if ! $(pip_cmd) download --no-deps "${PIP_TARGET_ARGS[@]}" -d "$tmp" "$spec" >"$tmp/.log" 2>&1; then
        tail -n 3 "$tmp/.log" | sed 's/^/    pip: /'
        rm -rf "$tmp"
        return 1
    fi
    new=0
    for f in "$tmp"/*.whl; do
        [ -f "$f" ] || continue
        local dist
        dist="$(wheel_dist "$f")"
        for old in "$WHL_DIR"/*.whl; do
            [ -f "$old" ] && [ "$(wheel_dist "$old")" = "$dist" ] && rm -f "$old"
        done
        mv "$f" "$WHL_DIR/" && new=1
        note "  got $(basename "$f") ($(du -k "$WHL_DIR/$(basename "$f")" | cut -f1) KiB)"
    done
    rm -rf "$tmp"
    [ "$new" = 1 ]
}

do_prepare() {
    mkdir -p "$WHL_DIR" || { echo "gpu_check.sh --prepare: cannot create $WHL_DIR" >&2; return 1; }
    local missing="$WHL_DIR/MISSING.txt" got=0 spec
    {
        echo "# Wheels scripts/gpu_check.sh --prepare could not or did not bring ($(date -u +%Y-%m-%dT%H:%M:%SZ))."
        echo "# The bench reports a missing peer as skipped."
    } >"$missing"
    note "downloading the peers' wheels for CPython 3.12 manylinux x86-64 into $WHL_DIR with: $(pip_cmd)"
    for spec in $WHEELS; do
        note "$spec"
        if fetch_wheel "$spec"; then got=$((got + 1))
        else echo "$spec: no wheel for CPython 3.12 / manylinux x86-64 (or no network)" >>"$missing"; fi
    done
    echo "$SKIPPED_WHEELS" >>"$missing"
    # Their requirements that the device lacks, transitively (a few rounds suffice).
    local req have
    for _ in 1 2 3; do
        local todo=""
        compgen -G "$WHL_DIR/*.whl" >/dev/null || break
        have=" $(for f in "$WHL_DIR"/*.whl; do wheel_dist "$f"; done | tr '\n' ' ') $(normalise <<<"$DEVICE_PACKAGES" | tr '\n' ' ') "
        for req in $(wheel_requirements "$WHL_DIR"/*.whl | normalise | sort -u); do
            case "$have" in *" $req "*) ;; *) grep -qx "$req: .*" "$missing" 2>/dev/null || todo="$todo $req" ;; esac
        done
        [ -z "$todo" ] && break
        for req in $todo; do
            note "dependency $req (not on the device)"
            fetch_wheel "$req" || echo "$req: dependency, no wheel for CPython 3.12 / manylinux x86-64" >>"$missing"
        done
    done
    do_stamp || true
    list_wheels >"$WHL_DIR/MANIFEST.txt"
    note "wheels:"; sed 's/^/    /' "$WHL_DIR/MANIFEST.txt"
    note "missing or skipped:"; grep -v '^#' "$missing" | sed 's/^/    /'
    note "$WHL_DIR holds $(du -sk "$WHL_DIR" | cut -f1) KiB"
    report_travel_size
    if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1 && ! git -C "$ROOT" check-ignore -q "$WHL_DIR/x.whl" 2>/dev/null; then
        note "WARNING: $WHL_DIR is not git-ignored; it must be (add /.whl/ to .gitignore) so that only 'carry' sends it"
    fi
    if [ "$got" = 0 ]; then
        echo "gpu_check.sh --prepare: no wheel could be downloaded (no network? see $missing)" >&2
        return 1
    fi
    return 0
}

# What the device tool sends: tracked + untracked-not-ignored files, plus the
# carried .whl (limit 64 MiB).
report_travel_size() {
    git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1 || return 0
    local tree whl
    tree="$(git -C "$ROOT" ls-files -z -co --exclude-standard | (cd "$ROOT" && xargs -0 -r stat -c %s 2>/dev/null) | awk '{s += $1} END {print s + 0}')"
    whl="$(du -sb "$WHL_DIR" 2>/dev/null | cut -f1)"
    note "$(awk -v t="$tree" -v w="${whl:-0}" -v n="$(basename "$WHL_DIR")" 'BEGIN {
        printf "travelling tree %.1f MiB + carried %s %.1f MiB = %.1f MiB of the 64 MiB limit", t / 2^20, n, w / 2^20, (t + w) / 2^20}')"
}

# ------------------------------------------------------------------ stages
# Each stage_<name> runs as `timeout T bash gpu_check.sh --stage <name>`, so a
# hung compiler, test or sanitizer ends with its stage (timeout kills the
# stage's whole process group) and the next stage still runs.

stage_setup() {
    local rc=0
    if compgen -G "$WHL_DIR/*.whl" >/dev/null; then
        # --no-deps: never pip-install torch/triton over the image's own.
        run_cmd "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE_DIR" "$WHL_DIR"/*.whl || rc=$?
    else
        note "no wheels in $WHL_DIR (run scripts/gpu_check.sh --prepare here and carry .whl): peers will be skipped"
    fi
    [ -f "$WHL_DIR/MISSING.txt" ] && { note "$WHL_DIR/MISSING.txt:"; grep -v '^#' "$WHL_DIR/MISSING.txt" | sed 's/^/    /'; }
    run_cmd "$PYTHON" -c "$(py_env)" "$GPU_CHECK_TMP/env.json" "$(revision)" "$SANITIZER" || rc=$?
    return "$rc"
}

stage_build() {
    # CXX=/usr/bin/g++: the H100 image's default g++ wrapper built an extension
    # that segfaulted on the first C++ exception (README.md, Development).
    local cxx=()
    if [ -n "${GPU_CHECK_CXX:-}" ]; then cxx=(CXX="$GPU_CHECK_CXX")
    elif [ -x /usr/bin/g++ ]; then cxx=(CXX=/usr/bin/g++); fi
    # FUSEDLOSS_FORCE_CUDA=1: fail loudly rather than build a CPU-only extension.
    run_cmd env TORCH_CUDA_ARCH_LIST="$ARCHS" MAX_JOBS="$JOBS" "${cxx[@]}" FUSEDLOSS_FORCE_CUDA=1 \
        "$PYTHON" setup.py build_ext --inplace || return
    run_cmd "$PYTHON" -c 'import fusedloss, torch; assert fusedloss.built_with_cuda(), "built without CUDA kernels"; print("fusedloss._C has CUDA kernels; torch", torch.__version__, "cuda", torch.version.cuda, "GPU", torch.cuda.is_available())'
}

stage_kernels() {
    # Plain run first: a failure here is the kernels', not the sanitizer's.
    run_cmd "$PYTHON" scripts/gpu_check_kernels.py --device cuda --shapes all --check
}

pytest_extra_args() {
    local args=(-q -p no:cacheprovider --maxfail=20 -rfE)
    # pytest-xdist and pytest-timeout are in the device image; used when importable.
    "$PYTHON" -c "import xdist" >/dev/null 2>&1 && [ "$PYTEST_WORKERS" -gt 1 ] && args+=(-n "$PYTEST_WORKERS")
    # A hung test fails alone (with its stack) instead of taking the stage down.
    "$PYTHON" -c "import pytest_timeout" >/dev/null 2>&1 && args+=(--timeout=45)
    printf '%s\n' "${args[@]}"
}

run_pytest() {
    local args rc
    mapfile -t args < <(pytest_extra_args)
    # OMP_NUM_THREADS: 8 workers on 16 cores; TORCHINDUCTOR_COMPILE_THREADS=1:
    # no compile-worker pool per pytest worker (test_compile.py).
    # shellcheck disable=SC2086  # PYTEST_SELECT_FILES is split into words on purpose
    run_cmd env OMP_NUM_THREADS=2 TORCHINDUCTOR_COMPILE_THREADS=1 "$@" "$PYTHON" -m pytest "${args[@]}" \
        $PYTEST_SELECT_FILES
    rc=$?
    # 5: nothing selected (e.g. a file without CUDA tests) is not a failure.
    [ "$rc" = 5 ] && { note "no tests selected"; rc=0; }
    return "$rc"
}

stage_tests() {
    PYTEST_SELECT_FILES="$PYTEST_SELECT tests" run_pytest
}

stage_tests_single_pass() {
    # The CUDA single passes are opt-in until validated on a GPU
    # (fusedloss/_common.py): run the CUDA tests of every family through them.
    local files=() f
    for f in tests/test_linear_ce.py tests/test_linear_ce_trainer_features.py tests/test_single_pass.py \
             tests/test_reliability.py tests/test_contrastive_single_pass.py tests/test_sampled_single_pass.py \
             tests/test_contrastive.py tests/test_sampled.py; do
        [ -f "$f" ] && files+=("$f")
    done
    [ "${#files[@]}" -gt 0 ] || { note "no single-pass test files"; return 0; }
    PYTEST_SELECT_FILES="$PYTEST_SELECT ${files[*]}" run_pytest FUSEDLOSS_CUDA_SINGLE_PASS=1
}

sanitize() {
    local tool="$1" filter=() env=()
    [ -n "$SANITIZER_FILTER" ] && filter=(--kernel-name "$SANITIZER_FILTER")
    # One cudaMalloc per tensor: without PyTorch's caching allocator an
    # out-of-bounds access or uninitialised read inside a cached block is seen.
    case "$tool" in memcheck | initcheck) env=(PYTORCH_NO_CUDA_MEMORY_CACHING=1) ;; esac
    run_cmd env "${env[@]}" FUSEDLOSS_CUDA_SINGLE_PASS=1 "$SANITIZER" --tool "$tool" "${filter[@]}" \
        --error-exitcode "$SANITIZER_ERROR_RC" --print-limit 30 \
        "$PYTHON" scripts/gpu_check_kernels.py --device cuda --small
    local rc=$?
    [ "$rc" = "$SANITIZER_ERROR_RC" ] && note "$tool reported errors"
    return "$rc"
}

stage_memcheck() { sanitize memcheck; }
stage_racecheck() { sanitize racecheck; }
stage_synccheck() { sanitize synccheck; }
stage_initcheck() { sanitize initcheck; }

bench_part() {
    # One bench process per op family, each with its own JSON: a timeout loses
    # one family, not the whole benchmark.  Merged by bench_report.
    # shellcheck disable=SC2086  # BENCH_ARGS is split into words on purpose
    run_cmd "$PYTHON" -m fusedloss.bench --preset gpu --ops "$2" --json "$GPU_CHECK_TMP/bench_$1.json" $BENCH_ARGS
}

stage_bench_lce() { bench_part lce linear_ce; }
stage_bench_sampled() { bench_part sampled sampled_softmax,nce; }
stage_bench_pairs() { bench_part pairs info_nce,nt_xent,clip; }

stage_bench_report() {
    run_cmd "$PYTHON" -c "$(py_bench_report)" "$GPU_CHECK_TMP" "$GPU_CHECK_OUTDIR/bench.json" \
        "$GPU_CHECK_OUTDIR/bench.png" "$(revision)"
}

# ------------------------------------------------------------------ python helpers
py_env() {
    cat <<'EOF'
import importlib.metadata as md, json, os, platform, shutil, subprocess, sys
out, revision, sanitizer = sys.argv[1:4]
def cmd(*args):
    if not shutil.which(args[0]):
        return f"{args[0]}: not found"
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=20)
        return (p.stdout + p.stderr).strip()
    except Exception as e:
        return f"{args[0]}: {e}"
info = {"revision": revision, "python": sys.version.split()[0], "executable": sys.executable,
        "hostname": platform.node(), "cpus": os.cpu_count(),
        "nvidia_smi": cmd("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                          "--format=csv,noheader"),
        "nvcc": cmd("nvcc", "--version").splitlines()[-1:],
        "compute_sanitizer": cmd(sanitizer, "--version").splitlines()[-1:],
        "cxx": shutil.which("g++"), "ninja": shutil.which("ninja")}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["device"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                          "memory_bytes": p.total_memory}
except Exception as e:
    info["torch_error"] = repr(e)
peers = {}
for dist in ("cut-cross-entropy", "liger-kernel", "inf-cl", "triton", "transformers"):
    try:
        peers[dist] = md.version(dist)
    except md.PackageNotFoundError:
        peers[dist] = None
info["packages"] = peers
with open(out, "w") as f:
    json.dump(info, f, indent=1)
print(json.dumps(info, indent=1))
EOF
}

py_bench_report() {
    cat <<'EOF'
import glob, json, os, sys
tmp, out_json, out_png, revision = sys.argv[1:5]
parts, rows, meta = {}, [], None
for name in ("lce", "sampled", "pairs"):
    path = os.path.join(tmp, f"bench_{name}.json")
    if not os.path.exists(path):
        parts[name] = "missing (failed or timed out, see bench.log)"
        continue
    with open(path) as f:
        data = json.load(f)
    parts[name] = f"{len(data.get('rows', []))} rows"
    rows += data.get("rows", [])
    if meta is None:
        meta = {k: v for k, v in data.items() if k != "rows"}
if meta is None:
    sys.exit("bench_report: no bench part produced a JSON")
if not meta.get("git_revision"):
    meta["git_revision"] = revision  # the tree travelled without .git
meta["gpu_check"] = {"parts": parts, "revision": revision}
with open(out_json, "w") as f:
    json.dump(dict(meta, rows=rows), f, indent=1)
print(f"wrote {out_json}: {len(rows)} rows; parts: {parts}")
try:
    from fusedloss.bench import plot
    plot.plot(rows, out_png, title=f"fusedloss-bench · {meta.get('device', {}).get('name', '?')}")
    print(f"wrote {out_png}")
except Exception as e:
    print(f"bench_report: no plot: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(2)
EOF
}

py_summary_json() {
    cat <<'EOF'
import json, os, sys
tsv, env_json, out, revision, total = sys.argv[1:6]
stages = []
with open(tsv) as f:
    for line in f:
        name, status, rc, seconds, timeout, log, note = (line.rstrip("\n").split("\t") + [""] * 7)[:7]
        stages.append({"stage": name, "status": status, "rc": None if rc == "" else int(rc),
                       "seconds": float(seconds), "timeout": int(timeout), "log": log, "note": note})
env = {}
if os.path.exists(env_json):
    with open(env_json) as f:
        env = json.load(f)
result = {"schema": "fusedloss-gpu-check/1", "revision": revision, "environment": env, "stages": stages,
          "seconds": round(sum(s["seconds"] for s in stages), 1), "timeouts_total": int(total),
          "ok": all(s["status"] == "ok" for s in stages)}
with open(out, "w") as f:
    json.dump(result, f, indent=1)
EOF
}

# ------------------------------------------------------------------ the run
STATUS_TSV=""

write_summary() {
    local out="$GPU_CHECK_OUTDIR/summary.txt"
    {
        echo "fusedloss GPU check  revision: $(revision)"
        printf '%-18s %-9s %8s %8s  %s\n' stage status seconds timeout note
        awk -F'\t' '{printf "%-18s %-9s %8.1f %8s  %s\n", $1, $2, $4, $5, $7}' "$STATUS_TSV"
        awk -F'\t' '{s += $4; if ($2 != "ok") bad++} END {printf "total %.1f s; %d stage(s) not ok\n", s, bad}' "$STATUS_TSV"
    } >"$out"
    "$PYTHON" -c "$(py_summary_json)" "$STATUS_TSV" "$GPU_CHECK_TMP/env.json" "$GPU_CHECK_OUTDIR/gpu_check.json" \
        "$(revision)" "$(total_timeout)" >/dev/null 2>&1 || true
}

record() {  # name status rc seconds timeout log note
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$STATUS_TSV"
    write_summary
}

total_timeout() {
    local s t=0
    for s in $(selected_stages); do t=$((t + $(stage_timeout "$s"))); done
    echo "$t"
}

ONLY=""
SKIP=""
selected_stages() {
    local s
    for s in $(stage_names); do
        if [ -n "$ONLY" ]; then case ",$ONLY," in *",$s,"*) ;; *) continue ;; esac; fi
        case ",$SKIP," in *",$s,"*) continue ;; esac
        echo "$s"
    done
}

check_stage_list() {
    local s
    for s in ${1//,/ }; do
        stage_names | grep -qx "$s" || die_usage "unknown stage '$s' (stages: $(stage_names | tr '\n' ' '))"
    done
}

now() { date +%s.%N; }

# Keep each returned file under the device's 16 MiB limit (head and tail).
cap_file() {
    local f="$1" size half
    [ -f "$f" ] || return 0
    size="$(stat -c %s "$f")"
    [ "$size" -le "$FILE_CAP_BYTES" ] && return 0
    half=$((FILE_CAP_BYTES / 2 - 4096))
    { head -c "$half" "$f"; printf '\n\n[... gpu_check: %d bytes cut ...]\n\n' "$((size - 2 * half))"; tail -c "$half" "$f"; } >"$f.cap"
    mv "$f.cap" "$f"
}

run_check() {
    local outdir="$1"
    export GPU_CHECK_OUTDIR="$outdir"
    mkdir -p "$outdir" || { echo "gpu_check.sh: cannot create $outdir" >&2; exit 2; }
    # The device refuses to hand back deeper or odd paths; OUTDIR's own files only.
    if [ "${GPU_CHECK_ALLOW_NO_GPU:-0}" != 1 ] && ! nvidia-smi -L >/dev/null 2>&1; then
        echo "gpu_check.sh: no GPU visible (nvidia-smi -L failed); this check builds fusedloss in place and" >&2
        echo "  must run on the GPU machine. Use --dry-run here." >&2
        exit 3
    fi
    GPU_CHECK_TMP="$(mktemp -d)"
    export GPU_CHECK_TMP
    trap 'rm -rf "$GPU_CHECK_TMP"' EXIT
    STATUS_TSV="$GPU_CHECK_TMP/stages.tsv"
    : >"$STATUS_TSV"
    # Seen by every stage: the carried peers, and this checkout's fusedloss
    # (scripts/gpu_check_kernels.py is not run from the repository root).
    export PYTHONPATH="$ROOT:$SITE_DIR${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1
    local s t log start rc secs status built=1 note_text off
    note "revision $(revision); stages: $(selected_stages | tr '\n' ' ')(timeouts $(total_timeout) s)"
    if ! selected_stages | grep -qx build && selected_stages | grep -qvx setup; then
        # --only without build: use what an earlier call built on this warm machine.
        "$PYTHON" -c "import fusedloss; assert fusedloss.built_with_cuda()" >/dev/null 2>&1 || built=0
    fi
    local run_start left
    run_start="$(now)"
    for s in $(selected_stages); do
        t="$(stage_timeout "$s")"
        log="$(stage_field "$s" 3)"
        left="$(awk -v a="$run_start" -v b="$(now)" -v d="$DEADLINE" 'BEGIN {printf "%d", d - (b - a) - 5}')"
        if [ "$left" -lt 5 ]; then
            note "[$s] skipped: the ${DEADLINE}s deadline is reached"
            record "$s" skipped "" 0 "$t" "$log" "no time left before the ${DEADLINE}s deadline"
            continue
        fi
        [ "$left" -lt "$t" ] && t="$left"
        if [ "$s" != setup ] && [ "$s" != build ] && [ "$built" = 0 ]; then
            note "[$s] skipped: no CUDA build of fusedloss"
            record "$s" skipped "" 0 "$t" "$log" "no CUDA build of fusedloss"
            continue
        fi
        if [ "$s" = bench_report ] && ! compgen -G "$GPU_CHECK_TMP/bench_*.json" >/dev/null; then
            record "$s" skipped "" 0 "$t" "$log" "no bench part wrote a JSON"
            continue
        fi
        note "[$s] start (timeout ${t}s, log $log)"
        off="$(stat -c %s "$outdir/$log" 2>/dev/null || echo 0)"
        echo "===== $s: $(stage_desc "$s") (timeout ${t}s) =====" >>"$outdir/$log"
        start="$(now)"
        timeout -k 5 "$t" bash "$SELF" --stage "$s" >>"$outdir/$log" 2>&1
        rc=$?
        secs="$(awk -v a="$start" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}')"
        case "$rc" in
            0) status=ok; note_text="" ;;
            124 | 137) status=TIMEOUT; note_text="killed after ${t}s" ;;
            "$SANITIZER_ERROR_RC") status=FAIL; note_text="sanitizer errors (rc $rc)" ;;
            *) status=FAIL; note_text="rc $rc" ;;
        esac
        echo "===== $s: $status after ${secs}s =====" >>"$outdir/$log"
        note "[$s] $status (${secs}s)"
        if [ "$status" != ok ]; then
            # The device returns only the output's tail: show why, right here.
            tail -c +"$((off + 1))" "$outdir/$log" | tail -n 15 | sed "s/^/    [$s] /"
            [ "$s" = build ] && built=0
        fi
        record "$s" "$status" "$rc" "$secs" "$t" "$log" "$note_text"
    done
    for f in $OUT_FILES; do cap_file "$outdir/$f"; done
    echo
    cat "$outdir/summary.txt"
    awk -F'\t' '$2 != "ok" {bad = 1} END {exit bad}' "$STATUS_TSV"
}

dry_run() {
    local outdir="$1" s t total=0 ok=1
    export GPU_CHECK_DRY=1 GPU_CHECK_OUTDIR="$outdir" GPU_CHECK_TMP="\$TMP"
    echo "gpu_check dry run: OUTDIR=$outdir  revision: $(revision)"
    echo "files written to OUTDIR ($(wc -w <<<"$OUT_FILES") of the device's 8): $OUT_FILES"
    echo "environment of every stage: PYTHONPATH=$ROOT:$SITE_DIR PYTHONUNBUFFERED=1"
    for s in $(selected_stages); do
        t="$(stage_timeout "$s")"
        total=$((total + t))
        echo
        echo "stage $s timeout=${t}s log=$(stage_field "$s" 3): $(stage_desc "$s")"
        (cd "$ROOT" && "stage_$s" | sed 's/^/    /')
    done
    echo
    echo "total timeout: ${total}s (limit ${TOTAL_LIMIT}s); wall-clock deadline ${DEADLINE}s (later stages are cut short)"
    [ "$total" -le "$TOTAL_LIMIT" ] || { echo "WARNING: the timeouts exceed ${TOTAL_LIMIT}s"; ok=0; }
    echo
    echo "prerequisites checkable here:"
    if "$PYTHON" scripts/gpu_check_kernels.py --help >/dev/null 2>&1; then
        echo "  ok       scripts/gpu_check_kernels.py --help ($PYTHON)"
    else
        echo "  PROBLEM  scripts/gpu_check_kernels.py --help failed with $PYTHON"; ok=0
    fi
    if compgen -G "$WHL_DIR/*.whl" >/dev/null; then
        echo "  ok       wheels in $WHL_DIR: $(list_wheels | awk '{print $2}' | tr '\n' ' ')($(du -sk "$WHL_DIR" | cut -f1) KiB)"
    else
        echo "  MISSING  no wheels in $WHL_DIR: run scripts/gpu_check.sh --prepare (peers would be skipped)"
    fi
    [ -f "$WHL_DIR/MISSING.txt" ] && grep -v '^#' "$WHL_DIR/MISSING.txt" | sed 's/^/  missing  /'
    if [ -f "$WHL_DIR/REVISION" ]; then
        echo "  ok       $WHL_DIR/REVISION: $(sed -n 's/^revision=//p' "$WHL_DIR/REVISION")"
    else
        echo "  MISSING  $WHL_DIR/REVISION: run scripts/gpu_check.sh --stamp before the device call"
    fi
    if [ -f setup.py ]; then echo "  ok       setup.py"; else echo "  PROBLEM  setup.py not found"; ok=0; fi
    if [ "$ok" = 1 ]; then echo "dry run: ok"; else echo "dry run: problems found (see above)"; fi
    return 0
}

main() {
    local mode=run outdir="" stage=""
    while [ $# -gt 0 ]; do
        case "$1" in
            -h | --help) usage; exit 0 ;;
            --dry-run | -n) mode=dry ;;
            --prepare) mode=prepare ;;
            --stamp) mode=stamp ;;
            --stage) [ $# -ge 2 ] || die_usage "--stage needs a name"; mode=stage; stage="$2"; shift ;;
            --only) [ $# -ge 2 ] || die_usage "--only needs stage names"; check_stage_list "$2"; ONLY="$2"; shift ;;
            --only=*) check_stage_list "${1#*=}"; ONLY="${1#*=}" ;;
            --skip) [ $# -ge 2 ] || die_usage "--skip needs stage names"; check_stage_list "$2"; SKIP="$2"; shift ;;
            --skip=*) check_stage_list "${1#*=}"; SKIP="${1#*=}" ;;
            --) shift; [ $# -gt 0 ] && { outdir="$1"; shift; }; [ $# -eq 0 ] || die_usage "unexpected argument '$1'"; break ;;
            -*) die_usage "unknown argument '$1'" ;;
            *) [ -z "$outdir" ] || die_usage "unexpected argument '$1' (one OUTDIR only)"; outdir="$1" ;;
        esac
        shift
    done
    case "$mode" in
        prepare | stamp) [ -z "$outdir" ] || die_usage "--$mode takes no OUTDIR" ;;
    esac
    case "$mode" in
        prepare) do_prepare; exit $? ;;
        stamp) do_stamp; exit $? ;;
        stage) stage_names | grep -qx "$stage" || die_usage "unknown stage '$stage'"; "stage_$stage"; exit $? ;;
    esac
    outdir="${outdir:-${OUT:-}}"
    if [ -z "$outdir" ]; then
        [ "$mode" = dry ] || die_usage "no OUTDIR given and \$OUT is not set"
        outdir="\$OUT"  # a dry run just names it
    fi
    [ "$mode" = dry ] && { dry_run "$outdir"; exit 0; }
    run_check "$outdir"
}

main "$@"
