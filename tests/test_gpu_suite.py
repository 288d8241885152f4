"""The prepared GPU suite runs end to end (on the CPU, tiny models) so a lent device's minutes go to measuring."""

import pytest

from bench.gpu_report import markdown, update_results_md
from bench.gpu_suite import main, section, targets


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds contention


def test_gpu_suite_smoke(tmp_path):
    out, md = tmp_path / "gpu.json", tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\nkept\n")
    report = main(["--smoke", "--out", str(out), "--results-md", str(md)])
    assert out.is_file() and "errors" not in report
    assert report["attention_bf16"]["max_abs_diff_sdpa_vs_math"] < 0.05 * report["attention_bf16"]["feature_scale"]
    assert {r["arch"] for r in report["forward"]} == {"vit_digits_tiny", "vit_digits_small"}
    for step in [*report["semi_step"], report["compile"]]:
        # MFU against a small CPU matmul means nothing; the smoke run only proves the arithmetic runs
        assert step["img_per_s"] > 0 and step["mfu"] > 0 and step["estimate_gib"] > 0
    assert report["compile"]["compile"] == "eager"
    assert set(report["speedup_over_original"]) == {"vit_digits_tiny", "vit_digits_small"}
    assert [r["checkpointing"] for r in report["largest_batch"]] == [False, True]
    assert all(r["largest_labelled"] == 2 and r["capped"] for r in report["largest_batch"])  # no OOM on a CPU
    text = md.read_text()
    assert text.startswith("# Benchmark results\n\nkept") and "SMOKE RUN" in text and "not applicable" in text
    update_results_md(md, report)  # a rerun replaces the table
    assert md.read_text().count("gpu-suite:start") == 1
    # the GPU form of the table renders too (smoke numbers, never written anywhere)
    gpu_form = markdown({**report, "smoke": False, "spec_peak_tflops_bf16": 989.0})
    assert "Targets: ViT-H/14 MFU ≥ 45 %" in gpu_form and "SMOKE" not in gpu_form
    # a part that fails (e.g. torch.compile without Triton) is recorded and the rest still reports
    broken = dict(report)
    section(broken, "compile", lambda: (_ for _ in ()).throw(RuntimeError("no working Triton\ndetails")))
    assert broken["compile"] is None and broken["errors"] == {"compile": "RuntimeError: no working Triton"}
    broken["targets"] = targets(broken, "vit_digits_small")
    assert "`compile` failed: RuntimeError: no working Triton" in markdown({**broken, "smoke": False})

