"""The prepared GPU suite runs end to end (on the CPU, tiny models) so a lent device's minutes go to measuring."""

from bench.gpu_suite import main


def test_gpu_suite_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    report = main(["--smoke", "--out", str(out)])
    assert out.is_file()
    assert report["attention_bf16"]["max_abs_diff_sdpa_vs_math"] < 0.05 * report["attention_bf16"]["feature_scale"]
    assert {r["arch"] for r in report["forward"]} == {"vit_digits_tiny", "vit_digits_small"}
    for step in report["semi_step"]:
        assert step["img_per_s"] > 0 and 0 < step["mfu"] < 1
