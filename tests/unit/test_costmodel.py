"""The dry run's cost model: activation bytes against a measurement, memory rows, FLOPs, GPU choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine import costmodel as cm
from engine.config import load_plan
from engine.models.vit import ARCHS, build_vit
from engine.train import main
from kernels import soft_target_cross_entropy

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("arch, img, chans, pool, backend", [
    ("vit_digits_small", 16, 1, "avg", "sdpa"),
    ("vit_tiny_patch16", 48, 3, "token", "math"),
])
def test_activation_estimate_matches_saved_tensors(arch, img, chans, pool, backend, precision):
    """Bytes autograd saves for backward (saved_tensors_hooks, distinct storages) vs the estimate."""
    torch.manual_seed(0)
    model = build_vit(arch, img_size=img, in_chans=chans, num_classes=10, global_pool=pool,
                      attn_backend=backend, drop_path=0.1).train()
    batch = 6
    x, y = torch.randn(batch, chans, img, img), torch.randint(0, 10, (batch,))
    act = 2 if precision == "bf16" else 4
    weights = list(model.parameters())

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=act == 2):
            logits = model(x)
        return soft_target_cross_entropy(logits.float(), y, y, torch.ones(batch), smoothing=0.1)

    if act == 2:  # autocast's bf16 weight copies are a memory row of their own, not activations
        shapes = {tuple(w.shape) for w in weights} | {tuple(w.shape[::-1]) for w in weights}
        measured = measure_without_casts(step, weights, shapes)
    else:
        measured = cm.measure_saved_bytes(step, weights)
    estimate = batch * cm.vit_activation_bytes(ARCHS[arch], img, chans, 10, pool, backend, act, checkpointing=False)
    assert estimate == pytest.approx(measured, rel=0.15)


def measure_without_casts(fn, weights, shapes) -> int:
    skip = {w.untyped_storage().data_ptr() for w in weights}
    seen = {}

    def pack(t):
        if t.dtype == torch.bfloat16 and tuple(t.shape) in shapes:
            return t  # a cast of a weight (autocast's cache)
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_checkpointing_keeps_block_inputs_and_one_block():
    spec = ARCHS["vit_base_patch16"]
    plain = cm.vit_activation_bytes(spec, 224, 3, 1000, "avg", "sdpa", 2, checkpointing=False)
    ckpt = cm.vit_activation_bytes(spec, 224, 3, 1000, "avg", "sdpa", 2, checkpointing=True)
    block = cm.block_activation_bytes(197, 768, 12, 3072, 2, "sdpa")
    assert plain - ckpt == pytest.approx(11 * block - 12 * 197 * 768 * 4)


def test_memory_rows_for_the_b16_semi_recipe():
    cfg = load_plan(ROOT / "configs" / "b16_1pct.toml").stages["semi"]
    p = 86_567_656
    rows = cm.memory_rows("semi", cfg, p, p, world=8, act=2, checkpointing=False)
    assert rows["parameters (fp32)"] == 4 * p and rows["gradients"] == 4 * p
    assert rows["AdamW moments"] == 8 * p and rows["EMA teacher"] == 4 * p and rows["DDP gradient buckets"] == 4 * p
    per_image = cm.vit_activation_bytes(ARCHS["vit_base_patch16"], 224, 3, 1000, "avg", "sdpa", 2, False)
    assert rows["activations (saved for backward)"] == 96 * per_image  # 16 labelled + 80 unlabelled
    assert "DDP gradient buckets" not in cm.memory_rows("semi", cfg, p, p, world=1, act=2, checkpointing=False)


def test_fsdp_rows_shard_weights_optimizer_and_teacher_per_rank(capsys):
    cfg = load_plan(ROOT / "configs" / "b16_1pct.toml", [("dist.strategy", "fsdp")]).stages["semi"]
    p = 86_567_656
    rows = cm.memory_rows("semi", cfg, p, p, world=8, act=2, checkpointing=False)
    assert rows["parameters (fp32)"] == 4 * p // 8 and rows["AdamW moments"] == 8 * p // 8
    assert rows["EMA teacher"] == 4 * p // 8 and "DDP gradient buckets" not in rows
    d = 768  # two ViT-B blocks gathered in bf16
    assert rows["FSDP all-gathered blocks"] == 2 * 2 * (12 * d * d + 10 * d)
    assert main(["--cfg", str(ROOT / "configs" / "b16_1pct.toml"), "--dry-run", "--dist.strategy", "fsdp"]) == 0
    out = capsys.readouterr().out
    assert "dist.strategy = fsdp" in out
    assert "per-rank state    GiB over 8 rank(s): ddp: parameters 0.322" in out and "fsdp: parameters 0.0403" in out


def test_dry_run_prints_memory_flops_and_assumed_time(capsys):
    assert main(["--cfg", str(ROOT / "configs" / "b16_1pct.toml"), "--dry-run", "--dry-run-gpu", "a100-40gb"]) == 0
    out = capsys.readouterr().out
    assert "activations (saved for backward)" in out and "fits a100-40gb" in out
    # 35.13 GFLOP x (3 x 96 student + 80 teacher) x 8 GPUs = 103 TFLOP per step
    assert "103 TFLOP per step" in out
    assert "ASSUMED MFU 40 % of the 312 TFLOP/s bf16 spec peak" in out and "on 8 x A100 40GB" in out


def test_h14_does_not_fit_a_40gb_gpu_at_a_large_batch(capsys):
    assert main(["--cfg", str(ROOT / "configs" / "h14_1pct.toml"), "--dry-run", "--dry-run-gpu", "a100-40gb",
                 "--data.batch_size", "16"]) == 0
    totals = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("total")]
    assert "does NOT fit a100-40gb" in totals[0] and "<- this recipe" in totals[0]  # without checkpointing
    assert " fits a100-40gb" in totals[1]  # with activation checkpointing


def test_measured_mfu_from_a_gpu_suite_file(tmp_path, monkeypatch, capsys):
    report = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-12-01T00:00:00+00:00", "smoke": False,
              "matmul_peak_tflops_bf16": 800.0,
              "semi_step": [{"arch": "vit_base_patch16", "mfu": 0.5, "achieved_tflops": 400.0}]}
    (tmp_path / "gpu-NVIDIA_H100-2026-12-01.json").write_text(json.dumps(report))
    monkeypatch.setattr(cm, "RESULTS", tmp_path)
    assert cm.measured_throughput("h100-80gb", "vit_base_patch16") == (400.0, "measured for vit_base_patch16 in "
                                                                             "gpu-NVIDIA_H100-2026-12-01.json")
    tflops, source = cm.measured_throughput("h100-80gb", "vit_huge_patch14")
    assert tflops == pytest.approx(400.0) and "measured for vit_base_patch16" in source
    assert cm.measured_throughput("a100-80gb", "vit_base_patch16") is None
    assert main(["--cfg", str(ROOT / "configs" / "b16_1pct.toml"), "--dry-run"]) == 0
    assert "at 400 TFLOP/s each, compute only (measured for vit_base_patch16" in capsys.readouterr().out


def test_unknown_gpu_and_gpu_without_dry_run_are_usage_errors(capsys):
    assert main(["--dry-run", "--dry-run-gpu", "h100"]) == 2
    assert "did you mean 'h100-80gb'" in capsys.readouterr().err
    assert main(["--dry-run-gpu", "h200"]) == 2
    assert "add --dry-run" in capsys.readouterr().err
