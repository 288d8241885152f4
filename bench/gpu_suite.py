"""The GPU checks, prepared to run in one go on a lent device: python -m bench.gpu_suite [--out FILE]

1. attention backends (sdpa, math, xformers when installed) agree in bf16 on ViT-B/16;
2. forward throughput and peak memory of ViT-B/16 and ViT-H/14 at 224 px (bf16 autocast);
3. the real Semi-ViT training step (engine.stages.semi + the shared optimizer step, EMA included) in
   bf16 on synthetic tensors: ViT-B/16 with 16 labelled + 80 unlabelled, ViT-H/14 with 2 + 10; img/s,
   peak memory and MFU = achieved FLOP/s (the model's forward GFLOPs x 3 for the student's forward and
   backward over B + mu B images, + 1 for the teacher's forward over mu B) / the matmul peak measured
   here on a large bf16 matmul.

Writes one JSON file (device name, date, versions, every number). `--smoke` runs the same code on the
CPU with a tiny model, so the script is tested where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from engine.config import Config, DataConfig, ModelConfig, SemiConfig
from engine.models import build_vit, forward_gflops
from engine.optim import build_optimizer
from engine.runtime import Runtime
from engine.stages.loop import optimizer_step
from engine.stages.semi import SemiStage


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call (host syncs only around the timed block)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def matmul_peak_tflops(device, dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, warmup=3, iters=10)
    return 2 * n**3 / seconds / 1e12


def attention_agreement(arch: str, img: int, device, dtype, batch: int) -> dict:
    torch.manual_seed(0)
    model = build_vit(arch, img_size=img).to(device).eval()
    x = torch.randn(batch, model.patch_embed.proj.in_channels, img, img, device=device)
    outs, result = {}, {}
    for backend in ("sdpa", "math", "xformers"):
        try:
            model.set_attn_backend(backend)
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
                outs[backend] = model.forward_features(x).float()  # (B, 1+N, D): the head is near zero at init
        except (RuntimeError, ImportError) as err:
            result[f"{backend}_skipped"] = str(err).splitlines()[0]
    for backend, out in outs.items():
        if backend != "math":
            result[f"max_abs_diff_{backend}_vs_math"] = (out - outs["math"]).abs().max().item()
    result["feature_scale"] = outs["math"].abs().max().item()
    return result


def forward_throughput(arch: str, img: int, device, dtype, batch: int, iters: int) -> dict:
    model = build_vit(arch, img_size=img).to(device).eval()
    x = torch.randn(batch, model.patch_embed.proj.in_channels, img, img, device=device)
    peak_reset(device)

    def step():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
            model(x)

    seconds = timed(step, device, warmup=3, iters=iters)
    return {"arch": arch, "batch": batch, "img_per_s": batch / seconds, "peak_gib": peak_gib(device),
            "gflops_per_img": forward_gflops(model, img)}


class MetricSink:
    """Takes the training step's metrics and records nothing (timing runs only)."""

    def accumulate(self, metrics, images, data_wait=0.0):
        pass


class _Synthetic:
    """Stands in for the data streams: the same tensors every step, already on the device."""

    evaluation = None  # the timed step never evaluates

    def __init__(self, b, mu, chans, img, classes, device):
        self.labelled_batch = (torch.randn(b, chans, img, img, device=device),
                               torch.randint(0, classes, (b,), device=device))
        u = torch.randn(mu * b, chans, img, img, device=device)
        self.unlabelled_batch = (u, u.flip(-1).clone(), torch.randint(0, classes, (mu * b,), device=device))

    def forever(self, batch):
        while True:
            yield batch


def semi_step(arch: str, img: int, device, dtype, b: int, mu: int, iters: int, peak_tflops: float) -> dict:
    cfg = Config(model=ModelConfig(arch=arch, img_size=img), data=DataConfig(batch_size=b, root="synthetic"),
                 semi=SemiConfig(mu=mu))
    rt = Runtime(device=device, dtype=dtype)
    student = build_vit(arch, img_size=img).to(device)
    data = _Synthetic(b, mu, student.patch_embed.proj.in_channels, img, 1000, device)
    stage = SemiStage(cfg, data, student, student)
    optimizer = build_optimizer(student, cfg.optim, lr=1e-4)
    params = [p for p in student.parameters() if p.requires_grad]
    batches = zip(data.forever(data.labelled_batch), data.forever(data.unlabelled_batch))
    peak_reset(device)

    def step():
        optimizer_step(stage, student, optimizer, params, batches, cfg, rt, MetricSink())
        stage.after_step()

    seconds = timed(step, device, warmup=3, iters=iters)
    gflops = forward_gflops(student, img)
    flops_per_step = gflops * 1e9 * (3 * (b + mu * b) + mu * b)
    achieved = flops_per_step / seconds / 1e12
    return {"arch": arch, "labelled": b, "unlabelled": mu * b, "step_ms": seconds * 1e3,
            "img_per_s": (b + mu * b) / seconds, "peak_gib": peak_gib(device),
            "achieved_tflops": achieved, "mfu": achieved / peak_tflops}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="", help="JSON file (default bench/results/gpu-<device>-<date>.json)")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script itself")
    args = parser.parse_args(argv)
    smoke = args.smoke or not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.bfloat16
    name = "cpu (smoke)" if smoke else torch.cuda.get_device_name(device)
    big, huge, img = ("vit_digits_tiny", "vit_digits_small", 16) if smoke else \
        ("vit_base_patch16", "vit_huge_patch14", 224)
    iters = 2 if smoke else 20
    report = {"device": name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "python": platform.python_version(), "smoke": smoke}
    report["matmul_peak_tflops_bf16"] = peak = matmul_peak_tflops(device, dtype, 256 if smoke else 8192)
    report["attention_bf16"] = attention_agreement(big, img, device, dtype, batch=4 if smoke else 32)
    report["forward"] = [forward_throughput(big, img, device, dtype, batch=8 if smoke else 256, iters=iters),
                         forward_throughput(huge, img, device, dtype, batch=8 if smoke else 64, iters=iters)]
    report["semi_step"] = [semi_step(big, img, device, dtype, b=16, mu=5, iters=iters, peak_tflops=peak),
                           semi_step(huge, img, device, dtype, b=2, mu=5, iters=iters, peak_tflops=peak)]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out or not smoke:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        out = Path(args.out or f"bench/results/gpu-{name.replace(' ', '_')}-{stamp}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
