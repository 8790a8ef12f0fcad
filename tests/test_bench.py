"""The bench's own logic at tiny sizes: CLI parsing, OOM handling, table and
JSON building, peer skipping, the CPU subprocess memory path. No timing asserts."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss.bench import __main__ as cli
from fusedloss.bench import cases, measure, report, runner, variants

TINY = {"N": 32, "D": 8, "V": 100}


def _cfg(shapes, **kw):
    kw.setdefault("isolate", False)
    kw.setdefault("progress", False)
    kw.setdefault("repeat", 1)
    kw.setdefault("warmup", 0)
    return runner.Config(shapes=shapes, device="cpu", **kw)


def _fake_case(monkeypatch, fused, reference):
    """Register a fake op 'fake' whose fused/reference functions are given."""
    monkeypatch.setattr(fusedloss, "_bench_fake_loss", fused, raising=False)
    monkeypatch.setattr(fusedloss.reference, "_bench_fake_loss", reference, raising=False)
    case = cases.Case("fake", "_bench_fake_loss", ("N", "D", "V"), "V", cases.CASES["linear_ce"].make_inputs,
                      lambda fn, x: fn(x["input"], x["weight"], x["target"]), ("input", "weight"),
                      lambda s: s["N"] * s["V"])
    monkeypatch.setitem(cases.CASES, "fake", case)
    return case


def _ref_loss(x, w, y):
    return F.cross_entropy(x @ w.t(), y)


# ------------------------------------------------------------------ CLI
def test_parse_shapes_and_suffixes():
    [(op, shape, dtype)] = cli.parse_shape("linear_ce:4096x512x128k", list(cases.CASES))
    assert (op, shape, dtype) == ("linear_ce", {"N": 4096, "D": 512, "V": 128_000}, None)
    [(op, shape, dtype)] = cli.parse_shape("nce_loss:8x4x2x1M:bf16", list(cases.CASES))
    assert op == "nce" and shape == {"N": 8, "D": 4, "K": 2, "C": 1_000_000} and dtype == torch.bfloat16
    # an op-less shape applies to every selected op with that many dimensions
    assert [s[0] for s in cli.parse_shape("64x16", ["linear_ce", "info_nce", "clip"])] == ["info_nce", "clip"]
    with pytest.raises(Exception):
        cli.parse_shape("linear_ce:4x4", list(cases.CASES))
    with pytest.raises(ValueError):
        cases.resolve_op("no_such_op")


def test_cli_defaults_and_options():
    args = cli.build_parser().parse_args([])
    cfg = cli.config_from_args(args)
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert cfg.device == expected_device
    if expected_device == "cpu":
        assert cfg.shapes == cli.presets.PRESETS["cpu"] and cfg.repeat == 3 and not cfg.compile_reference
    args = cli.build_parser().parse_args(
        ["--device", "cpu", "--ops", "linear_ce,info_nce", "--preset", "contrastive", "--dtype", "fp64",
         "--repeat", "7", "--compile", "on", "--max-ram-gib", "2", "--json", "x.json", "--plot", "x.png"])
    cfg = cli.config_from_args(args)
    assert {s[0] for s in cfg.shapes} == {"info_nce"}
    assert cfg.dtype == torch.float64 and cfg.repeat == 7 and cfg.compile_reference
    assert cfg.ram_budget == 2 * cases.GiB
    assert args.json == "x.json" and args.plot == "x.png"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--preset", "nope"])


def test_gpu_preset_has_headline_shapes():
    shapes = cli.presets.PRESETS["gpu"]
    assert ("linear_ce", {"N": 8192, "D": 4096, "V": 128256}, torch.bfloat16) in shapes
    assert ("linear_ce", {"N": 8192, "D": 2304, "V": 256000}, torch.bfloat16) in shapes
    assert ("nce", {"N": 8192, "D": 256, "K": 8192, "C": 1_000_000}, torch.float32) in shapes
    assert ("clip", {"B": 65536, "D": 512}, torch.bfloat16) in shapes


# ------------------------------------------------------------ runs, tables, JSON
def test_in_process_run_table_and_json(tmp_path):
    path = tmp_path / "out.json"
    rc = cli.main(["--device", "cpu", "--shapes", "linear_ce:32x8x100", "info_nce:16x8", "--no-isolate",
                   "--repeat", "2", "--warmup", "0", "--quiet", "--json", str(path)])
    assert rc == 0
    data = json.loads(path.read_text())
    assert data["schema"] == report.SCHEMA
    for key in ("device", "torch", "cuda", "git_revision", "created", "config", "memory_method", "rows"):
        assert key in data
    assert data["device"]["type"] == "cpu"
    lce = data["rows"][0]
    assert lce["op"] == "linear_ce" and lce["shape"] == {"N": 32, "D": 8, "V": 100} and lce["dtype"] == "float32"
    fused, ref = lce["variants"]["fused"], lce["variants"]["reference"]
    for r in (fused, ref, lce["variants"]["bare GEMMs"]):
        assert r["status"] == "ok"
        assert {"fwd_ms", "bwd_ms", "full_ms", "peak_extra_bytes", "tflops"} <= set(r)
    assert fused["within_tolerance"] and fused["loss_diff"] < 1e-5
    assert "speedup" in lce and "fused_over_gemm" in lce and not lce["flagged"]
    assert lce["variants"]["cut-cross-entropy (cce)"]["status"] == "skipped"  # Triton: a GPU only
    # CPU peers run when installed (benchmarks/run installs Cut Cross-Entropy; CI does not).
    assert lce["variants"]["cut-cross-entropy (torch_compile)"]["status"] in ("ok", "skipped")
    assert lce["variants"]["torch F.linear_cross_entropy (chunked)"]["status"] == "ok"
    assert lce["fused_path"] == "single pass"


@pytest.mark.parametrize("shape", ["sampled_softmax:16x8x5x40", "nce:16x8x5x40", "info_nce:16x8", "nt_xent:16x8",
                                   "clip:16x8"])
def test_every_op_races_its_bare_gemm_floor(tmp_path, shape):
    """The floor of every row: the logits GEMM and its two gradient GEMMs
    (on the gathered candidates for the sampled losses), and the fused path taken."""
    path = tmp_path / "out.json"
    assert cli.main(["--device", "cpu", "--shapes", shape, "--no-isolate", "--repeat", "1", "--warmup", "0",
                     "--quiet", "--json", str(path)]) == 0
    (row,) = json.loads(path.read_text())["rows"]
    assert row["variants"]["bare GEMMs"]["status"] == "ok" and row["fused_over_gemm"] > 0
    # The ratios come from alternating steps in one process; the separate runs' quotients are kept too.
    assert row["fused_over_gemm"] == row["fused_over_gemm_paired"] and row["fused_over_gemm_separate"] > 0
    assert row["speedup"] == row["speedup_paired"] and row["speedup_separate"] > 0
    assert row["fused_path"] == "single pass" and not row["flagged"]


def test_fused_path_names_blocks_and_the_recompute_pair():
    plan = cases._single_pass_block_rows(100_000, 65536)
    assert cases.fused_path("cpu", plan, 100_000) == "single pass, 1024-row blocks"
    assert cases.fused_path("cpu", plan, 100_000, whole_tile_only=True) == "recompute"
    assert cases.fused_path("cpu", cases._single_pass_block_rows(10, 10**7), 10) == "recompute"
    # The sampled ops' own sizing: a [2048, 16 + 4096] fp32 tile (33.7 MB) fits
    # the 64 MiB CPU default whole; 8192 rows take blocks of the budget less the
    # candidates' 4 MiB [K, D] gradient accumulator.
    sampled = {"N": 2048, "D": 256, "K": 4096, "C": 50_000}
    assert cases._sampled_path(sampled, torch.float32, "cpu") == "single pass"
    assert cases._sampled_path(dict(sampled, N=8192), torch.float32, "cpu") == "single pass, 3825-row blocks"


def test_table_building():
    rows = [
        {"op": "linear_ce", "shape_str": "N=4 D=2 V=8", "dtype": "float32", "status": "ok", "flagged": True,
         "speedup": 2.0, "memory_ratio": 10.0,
         "variants": {
             "fused": {"status": "ok", "fwd_ms": 1, "bwd_ms": 2, "full_ms": 3, "peak_extra_bytes": 2**20,
                       "loss_diff": 0.5, "grad_diff": 0.1, "within_tolerance": False},
             "reference": {"status": "ok", "fwd_ms": 2, "bwd_ms": 4, "full_ms": 6, "peak_extra_bytes": 10 * 2**20},
             "liger-kernel": {"status": "skipped", "reason": "needs a CUDA device"}}},
        {"op": "nce", "shape_str": "N=1M", "dtype": "float32", "status": "ok", "flagged": False,
         "variants": {"fused": {"status": "ok", "fwd_ms": 1, "bwd_ms": 1, "full_ms": 2, "peak_extra_bytes": 0},
                      "reference": {"status": "oom", "reason": "OOM (needs ~30.0 GiB): killed"}}},
        {"op": "clip", "shape_str": "B=8 D=2", "dtype": "float32", "status": "skipped", "reason": "not built",
         "variants": {}, "flagged": False},
    ]
    summary = report.summary_rows(rows)
    assert summary[0][3:6] == ("3.00", "6.00", "2.00x") and summary[0][-1] == "WRONG"
    assert summary[1][4] == "OOM (needs ~30.0 GiB)" and summary[1][-1] == "n/a (no reference)"
    assert summary[2][-1] == "skipped: not built"
    detail = report.detail_rows(rows)
    assert [d[3] for d in detail] == ["fused", "reference", "liger-kernel", "fused", "reference"]
    assert detail[1][9] == "2.00x" and detail[2][-1] == "needs a CUDA device"
    meta = {"device": {"name": "x", "type": "cpu"}, "torch": "t", "cuda": None, "config": {"repeat": 1}}
    text = report.render(rows, meta)
    assert "WARNING: 1 row(s)" in text and "skipped: not built" in text
    assert all(len(line) < 400 for line in text.splitlines())


def test_wrong_fused_result_is_flagged(monkeypatch):
    _fake_case(monkeypatch, lambda x, w, y: _ref_loss(x, w, y) * 1.01, _ref_loss)
    [row] = runner.run(_cfg([("fake", TINY, None)]))
    assert row["flagged"] and row["variants"]["fused"]["within_tolerance"] is False
    assert report.summary_rows([row])[0][-1] == "WRONG"


def test_reference_oom_is_reported_and_fused_keeps_going(monkeypatch):
    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 30.00 GiB")

    _fake_case(monkeypatch, _ref_loss, oom)
    [row] = runner.run(_cfg([("fake", TINY, None)]))
    assert row["variants"]["reference"]["status"] == "oom"
    assert row["variants"]["reference"]["reason"].startswith("OOM (needs ~")
    assert row["variants"]["fused"]["status"] == "ok" and not row["flagged"]
    assert "speedup" not in row


def test_broken_variant_is_an_error_not_a_crash(monkeypatch):
    def broken(*args):
        raise RuntimeError("kernel exploded")

    _fake_case(monkeypatch, broken, _ref_loss)
    [row] = runner.run(_cfg([("fake", TINY, None)]))
    assert row["variants"]["fused"]["status"] == "error" and "kernel exploded" in row["variants"]["fused"]["reason"]
    assert row["flagged"]


def test_tiny_ram_budget_reports_oom_without_running():
    [row] = runner.run(_cfg([("linear_ce", {"N": 64, "D": 8, "V": 4096}, None)], isolate=True, ram_budget=1))
    for name in ("fused", "reference", "bare GEMMs"):
        assert row["variants"][name]["status"] == "oom"
        assert "needs ~" in row["variants"][name]["reason"]
    assert report.summary_rows([row])[0][4].startswith("OOM (needs ~")


def test_reference_estimate_scales_with_logits():
    case = cases.CASES["linear_ce"]
    shape = {"N": 2048, "D": 256, "V": 1_000_000}
    ref = case.estimate_bytes("reference", shape, torch.float32, "cpu")
    assert ref >= 12 * 2048 * 1_000_000  # logits, softmax and their grad in fp32
    assert case.estimate_bytes("fused", shape, torch.float32, "cpu") < ref / 10


# -------------------------------------------------------------- CPU subprocess path
def test_cpu_subprocess_memory_measurement():
    shape = {"N": 256, "D": 16, "V": 50_000}
    cfg = _cfg([("linear_ce", shape, None)], isolate=True, repeat=2, warmup=1)
    [row] = runner.run(cfg)
    fused, ref = row["variants"]["fused"], row["variants"]["reference"]
    assert fused["status"] == "ok" and ref["status"] == "ok", (fused, ref)
    logits_bytes = shape["N"] * shape["V"] * 4
    assert ref["peak_extra_bytes"] >= logits_bytes  # the reference must show its [N, V] logits
    assert fused["peak_extra_bytes"] < ref["peak_extra_bytes"]
    assert fused["within_tolerance"] and not row["flagged"]
    # the alternating steps ran in a subprocess of their own
    assert row["fused_over_gemm_paired"] > 0 and row["speedup_paired"] > 0


def test_rss_probe_sees_an_allocation():
    with measure.RssPeak() as probe:
        t = torch.ones(64 * 2**20 // 4)
        del t
    assert probe.peak >= 32 * 2**20


# ------------------------------------------------------------------ peers, plot, sampler
def test_peers_are_skipped_not_failed():
    built = {v.name: v for v in variants.build_variants(cases.CASES["linear_ce"], "cpu")}
    assert built["cut-cross-entropy (cce)"].skip == "needs a CUDA device"
    assert built["liger-kernel"].skip == "needs a CUDA device"
    assert built["torch.compile(reference)"].skip
    missing = variants._peer("nope", "fusedloss_no_such_peer_module", "cuda", lambda m: None)
    assert missing.fn is None and "not installed" in missing.skip


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from fusedloss.bench import plot

    rows = runner.run(_cfg([("linear_ce", dict(TINY, V=v), None) for v in (100, 300)]))
    out = plot.plot(rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000 and out.endswith("p.png")


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch):
    import builtins

    from fusedloss.bench import plot

    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    with pytest.raises(plot.PlotUnavailable, match="pip install matplotlib"):
        plot.plot([], "x.png")


def test_log_uniform_sampled_values():
    gen = torch.Generator().manual_seed(0)
    target = torch.tensor([0, 5, 99])
    sampled, true_exp, sampled_exp = cases.log_uniform_sampled_values(target, 64, 100, gen)
    assert sampled.shape == (64,) and true_exp.shape == (3, 1) and sampled_exp.shape == (64,)
    assert int(sampled.min()) >= 0 and int(sampled.max()) < 100
    # expected counts over all classes add up to the number of draws
    _, all_exp, _ = cases.log_uniform_sampled_values(torch.arange(100), 64, 100, gen)
    assert math.isclose(float(all_exp.sum()), 64, rel_tol=1e-5)
    assert float(true_exp[0]) > float(true_exp[2])  # Zipfian: frequent classes first


def test_million_class_demo_runs_tiny(capsys):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                        "train_million_class.py")
    spec = importlib.util.spec_from_file_location("train_million_class", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.main(["--classes", "2000", "--dim", "8", "--batch", "16", "--num-sampled", "32", "--steps", "4",
                      "--log-every", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "steps/s" in out and "reference full softmax" in out


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_uses_events_and_allocator_peak():
    cfg = runner.Config(shapes=[("linear_ce", {"N": 256, "D": 64, "V": 4096}, torch.bfloat16)], device="cuda",
                        repeat=2, warmup=1, progress=False, compile_reference=False)
    [row] = runner.run(cfg)
    fused, ref = row["variants"]["fused"], row["variants"]["reference"]
    assert fused["status"] == "ok" and ref["status"] == "ok"
    assert ref["peak_extra_bytes"] >= 256 * 4096 * 4  # the reference's fp32 logits
    assert fused["within_tolerance"], fused
    for peer in ("cut-cross-entropy (cce)", "cut-cross-entropy (torch_compile)", "liger-kernel",
                 "torch F.linear_cross_entropy (chunked)"):
        assert row["variants"][peer]["status"] in ("ok", "skipped", "error")
