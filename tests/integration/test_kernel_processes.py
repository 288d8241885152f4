"""Kernel checks that start a process of their own: `python -m kernels`, importing without loading the native
library, an OpenMP team smaller than asked for, the GPU kernels benchmark's smoke form, the sm_90 compile."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import (
    dispatch,
    native,
)

ROOT = Path(__file__).resolve().parents[2]

ROOT = Path(__file__).resolve().parents[2]


def test_python_m_kernels_reports_every_op():
    out = subprocess.run([sys.executable, "-m", "kernels"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for op in dispatch.OPS:
        assert f"{op}" in out.stdout
    assert "cpu tensors:" in out.stdout and "native" in out.stdout and "triton" in out.stdout


def test_import_does_not_load_the_library():
    code = ("import kernels, torch; import kernels.native as n; "
            "assert not any('semivit_native' in p for p in torch.ops.loaded_libraries), torch.ops.loaded_libraries; "
            "assert not n._loaded")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=native._REPO_ROOT, capture_output=True)


def test_native_inplace_ops_when_openmp_gives_fewer_threads_than_asked(native_ops):
    """OMP_THREAD_LIMIT=1 with torch set to 3 threads: the op plans 3 shares, the team has 1 thread,
    which must then visit every share (a share left unvisited would leave images unmixed)."""
    script = (
        "import torch, kernels.native\n"
        "assert kernels.native.load()\n"
        "torch.set_num_threads(3)\n"
        "from kernels.pseudo_mixup import draw_mix_randomness\n"
        "g = torch.Generator().manual_seed(0)\n"
        "images, prob = torch.randn(12, 3, 64, 64, generator=g), torch.rand(12, generator=g)\n"
        "d = draw_mix_randomness(12, 64, 64, 0.5, 'cpu', g)\n"
        "out, _, _ = torch.ops.semivit_native.pseudo_mixup(images, prob, *d, 0.5)\n"
        "torch.ops.semivit_native.pseudo_mixup_(images, prob, *d, 0.5)\n"
        "assert torch.equal(images, out)\n"
    )
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=native._REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_triton_gpu_kernels_bench_smoke(triton_ns, tmp_path):
    from bench.gpu_kernels import main

    out = tmp_path / "kernels.json"
    report = main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == report["rows"]
    assert report["errors"] == [] and report["smoke"]
    ops_seen = {r["op"] for r in report["rows"]}
    assert ops_seen == {"ema_update_", "pseudo_mixup", "pseudo_label", "soft_target_ce fwd+bwd"}
    for row in report["rows"]:
        assert {"target", "meets_target", "gb_per_s", "copy_ratio"} <= row.keys()
        for key in ("max_abs_diff", "prob_max_abs_diff", "grad_max_abs_diff", "lam_max_abs_diff"):
            if key in row and row["dtype"] in ("float32", "float32 <- float32"):
                assert row[key] < 1e-5, row
        for key in ("sweep", "sweep_bwd"):
            assert all("error" not in entry for entry in row.get(key, [])), row[key]
        if row["op"] == "pseudo_mixup" and row["impl"] == "triton":
            assert row["cutmix_exact"] and row["mask_equal"]
    assert all(v["ok"] for k, v in report["compile"].items() if isinstance(v, dict))
    assert sum("sweep" in row for row in report["rows"]) >= 4  # the sweep code ran (first setting only)


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None, reason="no NVIDIA Triton backend")
def test_triton_kernels_compile_for_sm90_without_a_gpu(triton_ns):
    """Compile every kernel for sm_90 (no GPU needed): the GPU run must not fail on a compile error, and
    the hot paths must use 16-byte vector loads and IEEE division / sqrt for the box arithmetic."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_kernels", "--ptx"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ptx = json.loads(proc.stdout)
    if "skipped" in ptx:
        pytest.skip(ptx["skipped"])
    for kernel in ("ema_fp32_bf16", "mixup_bf16_224", "pseudo_label_bf16", "soft_ce_fwd_fp32", "soft_ce_grad_bf16"):
        assert ptx[kernel].get("ld.global.v4.b32", 0) >= 1, (kernel, ptx[kernel])
    assert ptx["ema_fp32_bf16"].get("st.global.v4.b32", 0) >= 1
    assert ptx["mixup_bf16_224"].get("sqrt.rn.f64") == 1 and ptx["mixup_bf16_224"].get("div.rn.f32") == 1
