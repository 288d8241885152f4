"""The prepared GPU checks run end to end (on the CPU, tiny models) so a lent device's minutes go to
measuring, and they fail when any part of them failed."""

import json
import subprocess
from pathlib import Path

import pytest

from bench import gpu_summary
from bench.gpu_report import markdown, update_results_md
from bench.gpu_suite import Suite, main

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds contention


def test_the_smoke_run_measures_every_section_and_records_no_error(tmp_path):
    out, md = tmp_path / "gpu.json", tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\nkept\n")
    report = main(["--smoke", "--out", str(out), "--results-md", str(md)])
    assert gpu_summary.errors(report) == []  # nested ones included: kernels' parts, compile checks, sweeps
    assert report["finished"] and "not_run" not in report and "running" not in report
    assert json.loads(out.read_text())["finished"]
    assert report["attention_bf16"]["max_abs_diff_sdpa_vs_math"] < 0.05 * report["attention_bf16"]["feature_scale"]
    assert {r["arch"] for r in report["forward"]} == {"vit_digits_tiny", "vit_digits_small"}
    for step in [*report["semi_step"], report["compile"]]:
        # MFU against a small CPU matmul means nothing; the smoke run only proves the arithmetic runs
        assert step["img_per_s"] > 0 and step["mfu"] > 0 and step["estimate_gib"] > 0
    assert report["compile"]["compile"] == "eager"
    eager, step = report["compile_step"]  # no CUDA graphs row without CUDA
    assert (eager["compile_step"], step["compile_step"]) == (None, "eager") and step["img_per_s"] > 0
    assert (eager["labelled"], eager["unlabelled"]) == (2, 10) and "run.compile = step" in md.read_text()
    assert set(report["speedup_over_original"]) == {"vit_digits_tiny", "vit_digits_small"}
    assert {r["op"] for r in report["kernels"]["rows"]} == {"ema_update_", "pseudo_mixup", "pseudo_label",
                                                           "soft_target_ce fwd+bwd"}
    assert all(r["max_abs_diff"] < 0.02 for r in report["kernels"]["rows"] if "max_abs_diff" in r)
    assert all(c["ok"] for k, c in report["kernels"]["compile"].items() if isinstance(c, dict))
    assert report["kernel_sweep"] and report["semi_step_kernels"]["speedup"] > 0
    assert [r["checkpointing"] for r in report["largest_batch"]] == [False, True]
    assert all(r["largest_labelled"] == 2 and r["capped"] for r in report["largest_batch"])  # no OOM on a CPU
    text = md.read_text()
    assert text.startswith("# Benchmark results\n\nkept") and "SMOKE RUN" in text and "not applicable" in text
    assert "| pseudo_mixup | triton |" in text and "fused kernels vs torch versions" in text
    update_results_md(md, report)  # a rerun replaces the table
    assert md.read_text().count("gpu-suite:start") == 1
    # the GPU form of the table renders too (smoke numbers, never written anywhere)
    gpu_form = markdown({**report, "smoke": False, "spec_peak_tflops_bf16": 989.0})
    assert "ViT-H/14 semi step MFU >= 45 %" in gpu_form and "SMOKE" not in gpu_form


def _suite(tmp_path, budget=60.0):
    report = {"device": "cpu (smoke)", "date": "2026-12-07T00:00:00+00:00", "torch": "x", "smoke": True,
              "step_precision": "fp32", "matmul_peak_tflops_bf16": 1.0}
    return Suite(report, tmp_path / "s.json", tmp_path / "s.md", budget)


def test_each_section_is_saved_before_the_next_starts_so_a_killed_run_keeps_it(tmp_path):
    suite = _suite(tmp_path)
    suite.run("first", lambda: {"value": 1})
    seen = {}
    suite.run("second", lambda: seen.update(json.loads((tmp_path / "s.json").read_text())) or [])
    assert seen["first"] == {"value": 1} and seen["running"] == "second"  # what a killed run was doing
    assert "running" not in json.loads((tmp_path / "s.json").read_text())


def test_a_failing_section_is_recorded_and_the_next_still_runs(tmp_path):
    suite = _suite(tmp_path)
    suite.run("compile", lambda: (_ for _ in ()).throw(RuntimeError("no working Triton\ndetails")))
    suite.run("after", lambda: 3)
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["compile"] is None and saved["after"] == 3
    assert gpu_summary.errors(saved) == ["errors.compile: RuntimeError: no working Triton"]
    assert "`errors.compile: RuntimeError: no working Triton`" in (tmp_path / "s.md").read_text()


def test_no_section_starts_once_the_budget_is_spent(tmp_path):
    suite = _suite(tmp_path, budget=-1.0)
    suite.run("largest_batch", lambda: pytest.fail("must not run"))
    assert json.loads((tmp_path / "s.json").read_text())["not_run"] == ["largest_batch"]


def test_errors_nested_anywhere_in_a_report_are_all_found():
    report = {"kernels": {"errors": ["bench_soft_ce: Traceback\n  File x\nInterpreterError: boom"],
                          "rows": [{"op": "ema_update_", "graph_error": "capture failed"}],
                          "compile": {"soft_target_ce": {"ok": False, "error": "Unsupported: x"},
                                      "pseudo_label+pseudo_mixup": {"ok": True}}},
              "kernel_sweep": [{"sweep": [{"block": 1, "error": "too many resources"}]}],
              "errors": {"semi_step": "OutOfMemoryError: CUDA"}}
    found = gpu_summary.errors(report)
    assert found == ["kernels.errors: bench_soft_ce: Traceback | File x | InterpreterError: boom",
                     "kernels.rows[0].graph_error: capture failed",
                     "kernels.compile.soft_target_ce.error: Unsupported: x",
                     "kernel_sweep[0].sweep[0].error: too many resources",
                     "errors.semi_step: OutOfMemoryError: CUDA"]


def _gpu_report(**extra):
    kernels = {"rows": [
        {"op": "ema_update_", "target": 0.85, "meets_target": True, "copy_ratio": 0.9},
        {"op": "ema_update_", "target": 0.85, "meets_target": False, "copy_ratio": 0.7},
        {"op": "pseudo_mixup", "target": 0.8, "meets_target": True, "copy_ratio": 0.86}]}
    return {"device": "NVIDIA H100", "torch": "2.11.0", "smoke": False, "huge_arch": "vit_huge_patch14",
            "kernels": kernels, "semi_step": [{"arch": "vit_huge_patch14", "mfu": 0.5, "estimate_over_peak": 1.3}],
            "speedup_over_original": {"vit_huge_patch14": 1.2}, **extra}


def test_each_target_is_met_missed_or_not_measured():
    t = gpu_summary.targets(_gpu_report())
    assert t["h14_mfu_ge_45pct"] is True and t["speedup_ge_1_5x"] is False
    assert t["ema_ge_85pct_copy"] is False and t["ema_copy_ratio_min"] == 0.7  # every dtype must meet it
    assert t["pseudo_mixup_ge_80pct_copy"] is True and t["memory_estimate_within_15pct"] is False
    nothing = gpu_summary.targets({"smoke": False})
    assert all(nothing[k] is None for k in gpu_summary.TARGETS)
    lines = gpu_summary.target_lines(t)
    assert "target: ViT-H/14 semi step MFU >= 45 %: met (50.0 %)" in lines
    assert "target: EMA update (Triton) >= 85 % of copy bandwidth: MISSED (70.0 %)" in lines
    assert gpu_summary.target_lines(nothing)[0].endswith("not measured")


def _out_dir(tmp_path, report, codes, pytest_log):
    (tmp_path / "gpu-suite.json").write_text(json.dumps(report))
    (tmp_path / "exit-codes.txt").write_text(codes)
    (tmp_path / "pytest-cuda.log").write_text(pytest_log)
    return tmp_path


def test_the_summary_lists_every_error_of_every_part_and_fails(tmp_path, capsys):
    report = _gpu_report(running="compile", not_run=["largest_batch"],
                         errors={"original_step": "RuntimeError: x"})
    report["kernels"]["errors"] = ["bench_pseudo_label: InterpreterError: y"]
    out = _out_dir(tmp_path, report, "versions 0\nkernels 0\ntests 1\ngpu_suite 124\n",
                   "FAILED tests/unit/test_op_ema.py::test_x[triton] - AssertionError\n1 failed, 9 passed in 3.0s\n")
    assert gpu_summary.main([str(out)]) == 1
    text = capsys.readouterr().out
    for expected in ["CUDA Triton tests: 1 failed, 9 passed in 3.0s", "tests: exit 1", "gpu_suite: exit 124 (killed",
                     "tests: FAILED tests/unit/test_op_ema.py::test_x[triton]", "cut short during section 'compile'",
                     "section 'largest_batch' not run", "errors.original_step: RuntimeError: x",
                     "kernels.errors: bench_pseudo_label: InterpreterError: y", "errors (7):",
                     "target: ViT-H/14 semi step >= 1.5x the original-style step: MISSED (1.20x)"]:
        assert expected in text, expected


def test_a_clean_check_passes_and_a_missing_suite_json_fails(tmp_path, capsys):
    out = _out_dir(tmp_path, _gpu_report(), "versions 0\ntests 0\ngpu_suite 0\n", "10 passed in 1.0s\n")
    assert gpu_summary.main([str(out)]) == 0 and "errors: none" in capsys.readouterr().out
    (out / "gpu-suite.json").unlink()
    assert gpu_summary.main([str(out)]) == 1 and "wrote no JSON" in capsys.readouterr().out
    assert gpu_summary.main([str(out / "missing")]) == 2


def test_the_one_command_explains_itself_and_refuses_bad_arguments():
    script = str(ROOT / "bench" / "gpu_check.sh")
    helped = subprocess.run(["bash", script, "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "at most 8 minutes on one H100" in helped.stdout
    for args in ([], ["a", "b"], ["--smoke"], ["--bogus"]):
        bad = subprocess.run(["bash", script, *args], capture_output=True, text=True)
        assert bad.returncode == 2 and "OUT_DIR" in bad.stderr, args


def test_the_dali_benchmark_without_dali_runs_the_torchvision_baseline_and_says_so(tmp_path, monkeypatch):
    from bench import dali_gpu

    monkeypatch.setattr(dali_gpu.dali, "available", lambda: False)
    monkeypatch.setattr(dali_gpu, "loader_rate", lambda *a, **k: pytest.fail("DALI is not installed"))
    decoded = []
    real = dali_gpu.decode_rate
    monkeypatch.setattr(dali_gpu, "decode_rate", lambda *a: decoded.append(real(*a)) or decoded[-1])
    assert dali_gpu.main(["--smoke", "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["dali"].startswith("not installed (pip install nvidia-dali-cuda130")
    assert decoded and decoded[0] > 0 and not any(k.endswith("img_per_s") for k in result)  # smoke: no number


def test_a_smoke_run_claims_no_target(tmp_path, capsys):
    out = _out_dir(tmp_path, {**_gpu_report(), "smoke": True}, "tests 0\ngpu_suite 0\n", "3 passed in 1.0s\n")
    assert gpu_summary.main([str(out)]) == 0
    text = capsys.readouterr().out
    assert "targets: not applicable to a smoke run" in text and "met (" not in text and "MISSED" not in text
