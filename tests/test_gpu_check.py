"""scripts/gpu_check.sh and scripts/gpu_check_kernels.py, tested without a GPU
and without network: argument handling, the dry run's stages and timeouts, a
whole run with fake tools (stage timeouts, failures, the files it leaves),
--prepare against a fake pip, and the kernel driver on the CPU."""
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
DRIVER = os.path.join(ROOT, "scripts", "gpu_check_kernels.py")
STAGES = ["setup", "build", "kernels", "tests", "tests_single_pass", "memcheck", "racecheck", "synccheck",
          "initcheck", "bench_lce", "bench_sampled", "bench_pairs", "bench_report"]
TIME_LIMIT_S = 540  # the device allows 10 minutes a call; the check must end well inside it
MAX_OUT_FILES = 8   # the device returns at most 8 files from $OUT

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and GNU timeout")


def clean_env(tmp_path, **extra):
    """The environment without the device's OUT or any GPU_CHECK_* knob, with
    the wheel folder in tmp_path (the real .whl/ is never touched)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k != "OUT"}
    env["GPU_CHECK_WHL_DIR"] = str(tmp_path / "whl")
    env["GPU_CHECK_PYTHON"] = sys.executable
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(args, env, timeout=120):
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def executable(path, text):
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(path.stat().st_mode | stat.S_IEXEC | stat.S_IXGRP | stat.S_IXOTH)
    return path


# ---------------------------------------------------------------- arguments


def test_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
    with open(SCRIPT) as f:
        text = f.read()
    assert text.startswith("#!/usr/bin/env bash") and "set -uo pipefail" in text


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_clean():
    p = subprocess.run(["shellcheck", "-S", "warning", SCRIPT], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout


def test_help(tmp_path):
    p = run(["--help"], clean_env(tmp_path))
    assert p.returncode == 0, p.stderr
    for word in ["--prepare", "--dry-run", "--stamp", "--only", "OUTDIR", "$OUT", *STAGES]:
        assert word in p.stdout, word


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["a", "b"], "unexpected argument 'b'"),
    (["--only", "nonsense"], "unknown stage 'nonsense'"),
    (["--skip"], "--skip needs stage names"),
    (["--prepare", "somewhere"], "--prepare takes no OUTDIR"),
])
def test_bad_arguments(tmp_path, args, message):
    p = run(args, clean_env(tmp_path))
    assert p.returncode == 2
    assert message in p.stderr and "--help" in p.stderr
    assert not (tmp_path / "whl").exists()


def test_run_needs_outdir_or_out(tmp_path):
    p = run([], clean_env(tmp_path))
    assert p.returncode == 2 and "OUT is not set" in p.stderr


def test_run_refuses_without_gpu(tmp_path):
    # A fake nvidia-smi that fails, first on PATH, so that this holds on a GPU machine too.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "nvidia-smi", "#!/bin/sh\nexit 9\n")
    env = clean_env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}")
    p = run([str(tmp_path / "out")], env)
    assert p.returncode == 3 and "no GPU" in p.stderr
    assert not os.listdir(tmp_path / "out")


# ---------------------------------------------------------------- dry run


def dry_run(tmp_path, *args, **env):
    p = run(["--dry-run", *args], clean_env(tmp_path, **env))
    assert p.returncode == 0, p.stderr
    return p.stdout


def stage_blocks(out):
    """{stage: (timeout, [commands])} from the dry run's output."""
    blocks, current = {}, None
    for line in out.splitlines():
        m = re.match(r"stage (\S+) timeout=(\d+)s log=(\S+): ", line)
        if m:
            current = m.group(1)
            blocks[current] = (int(m.group(2)), [])
        elif current and line.strip().startswith("+ "):
            blocks[current][1].append(line.strip()[2:])
        elif not line.strip():
            current = None
    return blocks


def test_dry_run_lists_every_stage_with_a_timeout(tmp_path):
    out = dry_run(tmp_path, str(tmp_path / "out"))
    blocks = stage_blocks(out)
    assert list(blocks) == STAGES
    total = sum(t for t, _ in blocks.values())
    assert 0 < total <= TIME_LIMIT_S
    assert f"total timeout: {total}s" in out
    for name, (timeout, commands) in blocks.items():
        assert timeout > 0 and commands, name
    assert not (tmp_path / "out").exists(), "a dry run must not create OUTDIR"


def test_dry_run_commands(tmp_path):
    whl = tmp_path / "whl"
    whl.mkdir()
    (whl / "inf_cl-1.2.1-py3-none-any.whl").write_bytes(b"")
    (whl / "REVISION").write_text("revision=0123abc\n")
    out = dry_run(tmp_path, str(tmp_path / "out"))
    blocks = {name: " | ".join(cmds) for name, (_, cmds) in stage_blocks(out).items()}
    assert "pip install -q --no-index --no-deps" in blocks["setup"] and "--target /tmp/site" in blocks["setup"]
    assert "torch" not in blocks["setup"].split("--target")[1].split("-c")[0]  # never pip-installs torch
    build = blocks["build"]
    for part in ["TORCH_CUDA_ARCH_LIST=9.0", "MAX_JOBS=16", "setup.py build_ext --inplace"]:
        assert part in build
    assert ("CXX=/usr/bin/g++" in build) == os.access("/usr/bin/g++", os.X_OK)
    assert "gpu_check_kernels.py --device cuda --shapes all --check" in blocks["kernels"]
    assert "-m pytest" in blocks["tests"] and "-k cuda tests" in blocks["tests"]
    single = blocks["tests_single_pass"]
    assert "FUSEDLOSS_CUDA_SINGLE_PASS=1" in single and "tests/test_linear_ce.py" in single
    for tool in ["memcheck", "racecheck", "synccheck", "initcheck"]:
        cmd = blocks[tool]
        assert f"--tool {tool}" in cmd and "gpu_check_kernels.py --device cuda --small" in cmd
        assert "FUSEDLOSS_CUDA_SINGLE_PASS=1" in cmd and "--error-exitcode" in cmd
    for part, ops in [("lce", "linear_ce"), ("sampled", "sampled_softmax,nce"), ("pairs", "info_nce,nt_xent,clip")]:
        assert f"-m fusedloss.bench --preset gpu --ops {ops} --json" in blocks[f"bench_{part}"]
    assert "bench.json" in blocks["bench_report"] and "bench.png" in blocks["bench_report"]
    # the prerequisites it can check here
    assert "ok       scripts/gpu_check_kernels.py --help" in out
    assert "inf_cl-1.2.1-py3-none-any.whl" in out and "REVISION: 0123abc" in out
    files = re.search(r"files written to OUTDIR \(\d+ of the device's 8\): (.*)", out).group(1).split()
    assert 0 < len(files) <= MAX_OUT_FILES


def test_dry_run_reports_missing_wheels_and_defaults_to_out(tmp_path):
    out = dry_run(tmp_path)
    assert "OUTDIR=$OUT" in out
    assert "MISSING  no wheels" in out and "--prepare" in out
    out = dry_run(tmp_path, OUT=str(tmp_path / "device-out"))
    assert f"OUTDIR={tmp_path / 'device-out'}" in out


def test_dry_run_only_skip_and_timeout_override(tmp_path):
    blocks = stage_blocks(dry_run(tmp_path, "--only", "build,memcheck", "x"))
    assert list(blocks) == ["build", "memcheck"]
    blocks = stage_blocks(dry_run(tmp_path, "--skip", "bench_lce", "x", GPU_CHECK_TIMEOUT_BUILD=240))
    assert "bench_lce" not in blocks and blocks["build"][0] == 240


# ---------------------------------------------------------------- a whole run with fake tools


FAKE_PYTHON = """
#!/usr/bin/env bash
# Stands in for the device's python: records each call, fakes the heavy
# commands, hands everything else (inline helpers, imports) to the real one.
echo "python $*" >>"$FAKE_LOG"
case "$1" in
    setup.py) exit "${FAKE_BUILD_RC:-0}" ;;
    scripts/gpu_check_kernels.py) exit "${FAKE_KERNELS_RC:-0}" ;;
esac
if [ "$1" = -m ]; then
    case "$2" in
        pytest) sleep "${FAKE_PYTEST_SLEEP:-0}"; exit "${FAKE_PYTEST_RC:-0}" ;;
        pip) exit 0 ;;
        fusedloss.bench)
            while [ $# -gt 0 ]; do [ "$1" = --json ] && json="$2"; shift; done
            cat >"$json" <<'EOF'
{"schema": "fusedloss-bench/1", "device": {"name": "fake"}, "git_revision": null,
 "rows": [{"op": "linear_ce", "shape": {"N": 8, "D": 4, "V": 16}, "shape_str": "8x4x16", "size_dim": "V",
           "size": 16, "dtype": "bfloat16", "status": "ok",
           "variants": {"fused": {"status": "ok", "full_ms": 1.0, "peak_extra_bytes": 1024},
                        "reference": {"status": "ok", "full_ms": 2.0, "peak_extra_bytes": 4096}}}]}
EOF
            exit 0 ;;
    esac
fi
exec "$REAL_PYTHON" "$@"
"""

FAKE_SANITIZER = """
#!/usr/bin/env bash
echo "sanitizer $*" >>"$FAKE_LOG"
exit "${FAKE_SANITIZER_RC:-0}"
"""


@pytest.fixture
def fake_env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = executable(bin_dir / "python", FAKE_PYTHON)
    sanitizer = executable(bin_dir / "compute-sanitizer", FAKE_SANITIZER)
    log = tmp_path / "calls.log"
    log.write_text("")
    env = clean_env(tmp_path, GPU_CHECK_PYTHON=python, GPU_CHECK_SANITIZER=sanitizer, GPU_CHECK_ALLOW_NO_GPU=1,
                    GPU_CHECK_SITE=tmp_path / "site", GPU_CHECK_REVISION="deadbeef-test", FAKE_LOG=log,
                    REAL_PYTHON=sys.executable)
    return env, log


def read_summary(out_dir):
    with open(out_dir / "gpu_check.json") as f:
        return {s["stage"]: s for s in json.load(f)["stages"]}


def test_fake_run_writes_the_summary_last_and_at_most_8_files(tmp_path, fake_env):
    env, log = fake_env
    out_dir = tmp_path / "out"
    p = run([str(out_dir)], env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    files = sorted(os.listdir(out_dir))
    assert 0 < len(files) <= MAX_OUT_FILES, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) and (out_dir / f).is_file() for f in files)
    assert {"summary.txt", "gpu_check.json", "bench.json", "bench.png", "build.log", "tests.log",
            "sanitizer.log", "bench.log"} == set(files)
    summary = (out_dir / "summary.txt").read_text()
    # The summary table closes stdout (the device returns only the output's tail).
    assert p.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])
    assert all(re.search(rf"^{s}\s+ok\s+\d+\.\d\s+\d+", summary, re.M) for s in STAGES), summary
    data = json.loads((out_dir / "gpu_check.json").read_text())
    assert data["ok"] and data["revision"] == "deadbeef-test" and data["timeouts_total"] <= TIME_LIMIT_S
    assert [s["stage"] for s in data["stages"]] == STAGES
    assert "torch" in data["environment"] and data["environment"]["revision"] == "deadbeef-test"
    bench = json.loads((out_dir / "bench.json").read_text())
    assert bench["git_revision"] == "deadbeef-test" and len(bench["rows"]) == 3
    assert (out_dir / "bench.png").read_bytes()[:4] == b"\x89PNG"
    calls = log.read_text()
    assert "setup.py build_ext --inplace" in calls and "FUSEDLOSS_CUDA_SINGLE_PASS" not in calls  # env, not args
    assert calls.count("sanitizer --tool") == 4


def test_fake_run_build_failure_skips_the_rest(tmp_path, fake_env):
    env, log = fake_env
    env["FAKE_BUILD_RC"] = "1"
    out_dir = tmp_path / "out"
    p = run([str(out_dir)], env, timeout=120)
    assert p.returncode == 1
    stages = read_summary(out_dir)
    assert stages["setup"]["status"] == "ok" and stages["build"]["status"] == "FAIL"
    assert all(stages[s]["status"] == "skipped" for s in STAGES[2:])
    assert "[build] FAIL" in p.stdout and "skipped" in (out_dir / "summary.txt").read_text()
    assert "-m pytest" not in log.read_text()


def test_fake_run_stage_timeout_and_failures_do_not_stop_the_run(tmp_path, fake_env):
    env, log = fake_env
    env.update(GPU_CHECK_TIMEOUT_TESTS="1", FAKE_PYTEST_SLEEP="60", FAKE_SANITIZER_RC="86")
    out_dir = tmp_path / "out"
    start = time.monotonic()
    p = run(["--only", "build,tests,memcheck,kernels", str(out_dir)], env, timeout=120)
    assert time.monotonic() - start < 60, "the stage timeout did not stop the sleeping test run"
    assert p.returncode == 1
    stages = read_summary(out_dir)
    assert list(stages) == ["build", "kernels", "tests", "memcheck"]
    assert stages["tests"]["status"] == "TIMEOUT" and stages["tests"]["timeout"] == 1
    assert stages["memcheck"]["status"] == "FAIL" and "sanitizer errors" in stages["memcheck"]["note"]
    assert stages["kernels"]["status"] == "ok" and stages["build"]["status"] == "ok"
    assert "killed after 1s" in (out_dir / "summary.txt").read_text()


def test_fake_run_deadline_cuts_the_last_stages(tmp_path, fake_env):
    env, log = fake_env
    env.update(GPU_CHECK_DEADLINE="18", FAKE_PYTEST_SLEEP="60")
    out_dir = tmp_path / "out"
    p = run(["--only", "build,tests,memcheck", str(out_dir)], env, timeout=120)
    assert p.returncode == 1
    stages = read_summary(out_dir)
    assert stages["build"]["status"] == "ok"
    assert stages["tests"]["status"] == "TIMEOUT" and stages["tests"]["timeout"] < 60
    assert stages["memcheck"]["status"] == "skipped" and "deadline" in stages["memcheck"]["note"]


# ---------------------------------------------------------------- --prepare and --stamp


def fake_wheel(directory, dist, version, requires=()):
    path = os.path.join(directory, f"{dist}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        meta = [f"Metadata-Version: 2.1", f"Name: {dist}", f"Version: {version}"]
        meta += [f"Requires-Dist: {r}" for r in requires]
        z.writestr(f"{dist}-{version}.dist-info/METADATA", "\n".join(meta) + "\n")
    return path


FAKE_PIP = """
#!/usr/bin/env bash
# pip download --no-deps ... -d DIR SPEC: a small wheel per known spec, like PyPI would.
echo "pip $*" >>"$FAKE_LOG"
[ "$1" = download ] || exit 2
for a; do spec="$a"; done
while [ $# -gt 0 ]; do [ "$1" = -d ] && dir="$2"; shift; done
[ -n "${FAKE_PIP_OFFLINE:-}" ] && { echo "ERROR: network is unreachable" >&2; exit 1; }
exec "$REAL_PYTHON" "$FAKE_WHEEL_MAKER" "$dir" "$spec"
"""

WHEEL_MAKER = """
import sys, zipfile
directory, spec = sys.argv[1:3]
known = {
    "cut-cross-entropy==25.1.1": ("cut_cross_entropy", "25.1.1", ['torch', 'triton; platform_system == "Linux"',
                                                                  'pytest; extra == "test"']),
    "liger-kernel==0.8.5": ("liger_kernel", "0.8.5", ["torch>=2.1.2", "triton>=2.3.1", "tiny-dep>=1"]),
    "tiny-dep": ("tiny_dep", "1.0", ['colorama; sys_platform == "win32"']),
}
if spec not in known:
    print(f"ERROR: No matching distribution found for {spec}", file=sys.stderr)
    sys.exit(1)
dist, version, requires = known[spec]
with zipfile.ZipFile(f"{directory}/{dist}-{version}-py3-none-any.whl", "w") as z:
    meta = ["Metadata-Version: 2.1", f"Name: {dist}", f"Version: {version}"] + [f"Requires-Dist: {r}" for r in requires]
    z.writestr(f"{dist}-{version}.dist-info/METADATA", "\\n".join(meta) + "\\n")
"""


@pytest.fixture
def fake_pip(tmp_path):
    maker = tmp_path / "make_wheel.py"
    maker.write_text(WHEEL_MAKER)
    pip = executable(tmp_path / "pip", FAKE_PIP)
    log = tmp_path / "pip.log"
    return clean_env(tmp_path, GPU_CHECK_PIP=pip, FAKE_LOG=log, FAKE_WHEEL_MAKER=maker, REAL_PYTHON=sys.executable)


def test_prepare_downloads_wheels_deps_and_records_missing(tmp_path, fake_pip):
    whl = tmp_path / "whl"
    whl.mkdir()
    stale = fake_wheel(str(whl), "cut_cross_entropy", "24.0")  # two versions of one package break the install
    p = run(["--prepare"], fake_pip)
    assert p.returncode == 0, p.stdout + p.stderr
    wheels = sorted(f for f in os.listdir(whl) if f.endswith(".whl"))
    assert wheels == ["cut_cross_entropy-25.1.1-py3-none-any.whl", "liger_kernel-0.8.5-py3-none-any.whl",
                      "tiny_dep-1.0-py3-none-any.whl"]
    assert not os.path.exists(stale)
    missing = (whl / "MISSING.txt").read_text()
    assert "inf-cl==1.2.1: no wheel" in missing and "quack-kernels" in missing
    assert not re.search(r"^(torch|triton|colorama|pytest)\b", missing, re.M)  # on the device / not applicable
    pip_calls = (tmp_path / "pip.log").read_text()
    assert "--python-version 3.12" in pip_calls and "--no-deps" in pip_calls and "manylinux" in pip_calls
    assert "download" in pip_calls and " torch" not in pip_calls  # the device has torch and triton
    assert "MANIFEST.txt" in os.listdir(whl)
    if os.path.isdir(os.path.join(ROOT, ".git")):
        assert (whl / "REVISION").read_text().startswith("revision=")


def test_prepare_without_network_fails_gracefully(tmp_path, fake_pip):
    fake_pip["FAKE_PIP_OFFLINE"] = "1"
    p = run(["--prepare"], fake_pip)
    assert p.returncode == 1
    assert "no wheel could be downloaded" in p.stderr and "Traceback" not in p.stderr
    missing = (tmp_path / "whl" / "MISSING.txt").read_text()
    for spec in ["cut-cross-entropy", "liger-kernel", "inf-cl"]:
        assert spec in missing


@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, ".git")) or shutil.which("git") is None,
                    reason="needs a git checkout")
def test_stamp_and_wheel_folder_ignored(tmp_path):
    p = run(["--stamp"], clean_env(tmp_path))
    assert p.returncode == 0, p.stderr
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert (tmp_path / "whl" / "REVISION").read_text().startswith(f"revision={head}")
    # .whl/ travels only through `carry`: git (and so the device's tree copy) must ignore it.
    assert subprocess.run(["git", "check-ignore", "-q", ".whl/x.whl"], cwd=ROOT).returncode == 0


# ---------------------------------------------------------------- the kernel driver


def load_driver():
    spec = importlib.util.spec_from_file_location("gpu_check_kernels", DRIVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_driver_help_and_list():
    p = subprocess.run([sys.executable, DRIVER, "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "--small" in p.stdout and "--device" in p.stdout
    p = subprocess.run([sys.executable, DRIVER, "--list"], capture_output=True, text=True)
    names = [line.split()[0] for line in p.stdout.splitlines()]
    assert names == list(load_driver().CASES)
    for family in ["lce_recompute", "lce_single", "sampled_shared", "sampled_per_row", "nce", "sparse_grad",
                   "info_nce_symmetric", "nt_xent", "clip"]:
        assert any(family in n for n in names), family
    p = subprocess.run([sys.executable, DRIVER, "--only", "nope"], capture_output=True, text=True)
    assert p.returncode != 0 and "unknown case" in p.stderr


def test_driver_runs_every_case_on_the_cpu():
    p = subprocess.run([sys.executable, DRIVER, "--small", "--device", "cpu", "--check"], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    n = len(load_driver().CASES)
    assert f"{n}/{n} cases passed" in p.stdout
    assert "single pass; budget" in p.stdout  # the multi-block single pass really ran


def test_driver_check_catches_a_wrong_result():
    import torch

    import fusedloss

    driver = load_driver()
    runner = driver.Runner(torch, fusedloss, "cpu", driver.SHAPES["small"], check=True, seed=0)
    x = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(9, 4, requires_grad=True)
    y = torch.randint(0, 9, (6,))
    good = lambda x, w: fusedloss.reference.linear_cross_entropy(x, w, y)  # noqa: E731
    assert "max rel err" in runner._case(good, good, [x, w], torch.float32)
    with pytest.raises(driver.CheckError, match="relative error"):
        runner._case(lambda x, w: good(x, w) * 1.01, good, [x, w], torch.float32)
