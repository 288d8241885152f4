"""The GPU checks, prepared to run in one go on a lent device: python -m bench.gpu_suite [--out FILE]

Sections, most valuable first (a run cut short by its time cap still answers the main questions):

1. kernels: each fused Triton op against its reference on the GPU and its GB/s against the measured
   device-to-device copy bandwidth (bench.gpu_kernels), plus torch.compile(fullgraph=True) of the ops;
2. semi_step: the real Semi-ViT training step (engine.stages.semi + the shared optimizer step, EMA
   included) in bf16 on synthetic tensors: ViT-B/16 with 16 labelled + 80 unlabelled, ViT-H/14 with
   2 + 10; img/s, peak memory against the dry run's estimate (engine.costmodel), and MFU = achieved model
   FLOP/s (forward GFLOPs x (3 x (B + mu B) student + mu B teacher); checkpointing's recompute not
   counted) / the matmul peak measured here on a large bf16 matmul (the data-sheet peak is recorded too);
3. original_step: the original-style step (bench/original_step.py) on the same GPU and batches;
4. semi_step_kernels: the ViT-B/16 step with the Triton kernels against the same step with the torch
   versions (run.kernels);
5. compile_step: ViT-H/14 at 2 + 10 images, eager against run.compile = step against step + CUDA graphs
   (run.cuda_graphs), the first (compiling) step's seconds beside each;
6. compile: ViT-B/16 with torch.compile on the student (inductor);
7. attention_bf16, forward: attention backends agree in bf16; forward throughput and peak memory;
8. kernel_sweep: the kernels' launch-setting sweeps;
9. largest_batch: ViT-H/14 at the largest labelled batch per GPU that fits (unlabelled = 5 x; doubling
   from 2 up to 128, then halving the gap twice; 3 timed steps per trial), with and without activation
   checkpointing; no new trial after --budget seconds.

The JSON (device name, date, versions, every number, every error) is rewritten after every section, and
its table put into bench/RESULTS.md (bench/gpu_report.py); bench/gpu_summary.py turns it into the
verdict (each target met / missed / not measured, every error). `--smoke` runs the same code on the CPU
with tiny models (the Triton kernels in the interpreter), so the script is tested where there is no GPU;
a smoke run writes no GPU number anywhere.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

# Triton picks the interpreter when a kernel is decorated: decide before anything imports Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import gpu_kernels, gpu_summary  # noqa: E402
from bench.gpu_kernels import timed  # noqa: E402 (CUDA events on the GPU, perf_counter on the CPU)
from bench.gpu_report import update_results_md  # noqa: E402
from bench.original_step import OriginalStep  # noqa: E402
from engine import costmodel as cm  # noqa: E402
from engine.config import Config, DataConfig, ModelConfig, RunConfig, SemiConfig  # noqa: E402
from engine.models import build_vit, forward_gflops, param_count  # noqa: E402
from engine.runtime import Runtime  # noqa: E402
from engine.stages.semi import SemiStage  # noqa: E402
from engine.stages.standalone import StageSteps  # noqa: E402
from kernels import dispatch  # noqa: E402


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def build_on(device, arch: str, **kwargs):
    """Build and initialise the model on the device itself: ViT-H's init takes seconds on a CPU."""
    with torch.device(device):
        return build_vit(arch, **kwargs)


def matmul_peak_tflops(device, dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, warmup=3, iters=10)
    return 2 * n**3 / seconds / 1e12


def attention_agreement(arch: str, img: int, device, dtype, batch: int) -> dict:
    torch.manual_seed(0)
    model = build_on(device, arch, img_size=img).eval()
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
    model = build_on(device, arch, img_size=img).eval()
    x = torch.randn(batch, model.patch_embed.proj.in_channels, img, img, device=device)
    peak_reset(device)

    def step():
        with torch.no_grad(), Runtime(device=device, dtype=dtype).autocast():
            model(x)

    seconds = timed(step, device, warmup=3, iters=iters)
    return {"arch": arch, "batch": batch, "img_per_s": batch / seconds, "peak_gib": peak_gib(device),
            "gflops_per_img": forward_gflops(model, img)}


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


def semi_step(arch: str, img: int, device, dtype, b: int, mu: int, iters: int, peak_tflops: float,
              checkpointing: bool = False, compile_backend: str | None = None, compile_step: str | None = None,
              cuda_graphs: bool = False) -> dict:
    """The engine's semi step, timed. `compile_backend`: torch.compile the model with it (run.compile =
    model); `compile_step`: compile the whole micro-step with that backend (run.compile = step), replayed as
    a CUDA graph with `cuda_graphs`."""
    run = RunConfig(compile="step" if compile_step else "off", cuda_graphs=cuda_graphs)
    cfg = Config(run=run, model=ModelConfig(arch=arch, img_size=img, grad_checkpointing=checkpointing),
                 data=DataConfig(batch_size=b, root="synthetic"), semi=SemiConfig(mu=mu))
    rt = Runtime(device=device, dtype=dtype)
    student = build_on(device, arch, img_size=img, grad_checkpointing=checkpointing)
    forward = torch.compile(student, backend=compile_backend) if compile_backend else student
    data = _Synthetic(b, mu, student.patch_embed.proj.in_channels, img, 1000, device)
    batches = zip(data.forever(data.labelled_batch), data.forever(data.unlabelled_batch))
    step = StageSteps.of(SemiStage(cfg, data, student, forward), cfg, rt, batches, lr=1e-4,
                         compiler=compile_step or "inductor")
    peak_reset(device)

    t0 = time.perf_counter()
    step()  # compiles, when asked (and records the CUDA graph on its next calls)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first = time.perf_counter() - t0
    seconds = timed(step, device, warmup=min(3, iters), iters=iters)
    gflops = forward_gflops(student, img)
    flops_per_step = gflops * 1e9 * (3 * (b + mu * b) + mu * b)  # model FLOPs: a recompute is not counted
    achieved = flops_per_step / seconds / 1e12
    result = {"arch": arch, "labelled": b, "unlabelled": mu * b, "checkpointing": checkpointing,
              "compile": compile_backend, "compile_step": compile_step, "cuda_graphs": cuda_graphs,
              "first_step_s": first, "step_ms": seconds * 1e3, "img_per_s": (b + mu * b) / seconds,
              "achieved_tflops": achieved, "mfu": achieved / peak_tflops}
    result.update(memory_check(cfg, student, device, dtype, checkpointing))
    return result


def memory_check(cfg: Config, student, device, dtype, checkpointing: bool) -> dict:
    """Measured peak against the dry run's estimate for the same config (one process)."""
    p, trainable = param_count(student), param_count(student, trainable_only=True)
    act = 2 if dtype is not None else 4
    rows = cm.memory_rows("semi", cfg, p, trainable, world=1, act=act, checkpointing=checkpointing)
    estimate = sum(rows.values()) / 2**30
    peak = peak_gib(device)
    return {"peak_gib": peak, "estimate_gib": estimate,
            "estimate_over_peak": estimate / peak if peak else None}


def original_step(arch: str, img: int, device, dtype, b: int, mu: int, iters: int) -> dict:
    torch.manual_seed(0)
    student = build_on(device, arch, img_size=img)
    data = _Synthetic(b, mu, student.patch_embed.proj.in_channels, img, 1000, device)
    (x, y), (u_weak, u_strong, _) = data.labelled_batch, data.unlabelled_batch
    step = OriginalStep(student, classes=1000, dtype=dtype)
    seconds = timed(lambda: step(x, y, u_weak, u_strong), device, warmup=min(2, iters), iters=iters)
    return {"arch": arch, "labelled": b, "unlabelled": mu * b, "step_ms": seconds * 1e3,
            "img_per_s": (b + mu * b) / seconds}


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def largest_batch(arch: str, img: int, device, dtype, mu: int, iters: int, peak: float, checkpointing: bool,
                  cap: int, deadline: float) -> dict:
    """The largest even labelled batch (up to `cap`) whose step runs: doubling, then two bisections;
    no new trial starts after `deadline` (time.perf_counter()), so the suite keeps to its time budget."""
    def fits(b):
        try:
            return semi_step(arch, img, device, dtype, b, mu, iters, peak, checkpointing=checkpointing)
        except torch.OutOfMemoryError:
            return None
        finally:
            free(device)

    best, b, failed = None, 2, None
    while b <= cap and time.perf_counter() < deadline:
        result = fits(b)
        if result is None:
            failed = b
            break
        best, b = result, 2 * b
    for _ in range(2):  # narrow the gap between the last fit and the first failure
        if best is None or failed is None or failed - best["labelled"] <= 2 or time.perf_counter() > deadline:
            break
        mid = (best["labelled"] + failed) // 4 * 2
        result = fits(mid)
        best, failed = (result, failed) if result is not None else (best, mid)
    out_of_time = failed is None and b <= cap  # stopped by the deadline before reaching the cap
    return {"checkpointing": checkpointing, "largest_labelled": best["labelled"] if best else 0,
            "first_failed": failed, "capped": failed is None and not out_of_time, "out_of_time": out_of_time,
            "step": best}


def spec_peak(device_name: str) -> float | None:
    for gpu in cm.GPUS.values():
        if all(m in device_name for m in gpu.match):
            return gpu.bf16_tflops
    return None


def kernels_step_comparison(arch: str, img: int, device, dtype, b: int, iters: int, peak: float) -> dict:
    """The same semi step with the fused kernels (triton on CUDA; native or torch in smoke mode) and with
    the torch versions, alternated twice so clocks and caches treat both alike."""
    fused = "triton" if device.type == "cuda" else "auto"
    rows: dict[str, list[float]] = {fused: [], "torch": []}
    for _ in range(2):
        for backend in rows:
            dispatch.set_default(backend)
            try:
                rows[backend].append(semi_step(arch, img, device, dtype, b=b, mu=5, iters=iters,
                                               peak_tflops=peak)["step_ms"])
            finally:
                dispatch.set_default("auto")
    best = {k: min(v) for k, v in rows.items()}
    return {"arch": arch, "fused_backend": fused, "fused_step_ms": best[fused], "torch_step_ms": best["torch"],
            "speedup": best["torch"] / best[fused]}


def compile_modes(arch: str, img: int, device, dtype, iters: int, peak: float, smoke: bool,
                  progress=lambda rows: None) -> list[dict]:
    """The ViT-H/14 step at 2 + 10 images per GPU: eager, run.compile = step, step + CUDA graphs (`progress`
    gets the rows so far after each: a compile killed by the time cap keeps the rows before it). The smoke
    run traces the step with dynamo only (backend "eager") and has no CUDA graphs to replay."""
    compiler = "eager" if smoke else "inductor"
    modes = [{}, {"compile_step": compiler}]
    if device.type == "cuda":
        modes.append({"compile_step": compiler, "cuda_graphs": True})
    rows: list[dict] = []
    for mode in modes:
        rows.append(semi_step(arch, img, device, dtype, b=2, mu=5, iters=iters, peak_tflops=peak, **mode))
        free(device)
        progress(rows)
    torch._dynamo.reset()
    return rows


class Suite:
    """Runs the sections in order and rewrites the JSON (and the table) after each one, so a run killed by
    its time cap keeps everything measured so far. A failing section is recorded and the rest still runs;
    once ``budget`` seconds have passed no new section starts (it is listed under ``not_run``)."""

    def __init__(self, report: dict, out: Path | None, results_md: Path | None, budget: float):
        self.report, self.out, self.results_md = report, out, results_md
        self.t_start = time.perf_counter()
        self.deadline = self.t_start + budget

    def run(self, name: str, fn) -> None:
        report = self.report
        if time.perf_counter() > self.deadline:
            report.setdefault("not_run", []).append(name)
            self.save()
            return
        report["running"] = name  # what a killed run was doing
        self.save()
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as err:  # noqa: BLE001 (recorded in the JSON, the table and the summary)
            report[name] = None
            report.setdefault("errors", {})[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        report.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
        report.pop("running")
        self.save()

    def save(self) -> None:
        report = self.report
        report["targets"] = gpu_summary.targets(report)
        report["wall_seconds"] = round(time.perf_counter() - self.t_start, 1)
        if self.out is not None:
            report["json"] = str(self.out)
            gpu_kernels.write_atomic(self.out, json.dumps(report, indent=2) + "\n")
        if self.results_md is not None:
            update_results_md(self.results_md, report)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="", help="JSON file (default bench/results/gpu-<device>-<date>.json)")
    parser.add_argument("--results-md", default="", help="markdown file to put the table in (default "
                        "bench/RESULTS.md; a smoke run writes none unless given)")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script itself")
    parser.add_argument("--budget", type=float, default=220.0,
                        help="seconds after which no new section and no new largest-batch trial starts "
                        "(default 220; bench/gpu_check.sh caps the whole suite at 280 s)")
    args = parser.parse_args(argv)
    smoke = args.smoke or not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.bfloat16
    # The training steps run in bf16 on the GPU; the smoke run keeps them in fp32, because bf16 matmuls
    # on a CPU without bf16 units take seconds even for tiny models (the bf16 attention check still runs).
    step_dtype = None if smoke else dtype
    name = "cpu (smoke)" if smoke else torch.cuda.get_device_name(device)
    big, huge, img = ("vit_digits_tiny", "vit_digits_small", 16) if smoke else \
        ("vit_base_patch16", "vit_huge_patch14", 224)
    iters = 1 if smoke else 10
    b_big = 4 if smoke else 16  # labelled images per step of ViT-B/16 (the B/16 recipes' batch per GPU)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    out = Path(args.out) if args.out else None if smoke else \
        Path(f"bench/results/gpu-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{stamp}.json")
    results_md = Path(args.results_md) if args.results_md else None if smoke else Path("bench/RESULTS.md")
    report = {"device": name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "python": platform.python_version(), "smoke": smoke,
              "step_precision": "bf16 autocast" if step_dtype else "fp32", "huge_arch": huge, "big_arch": big,
              "budget_seconds": args.budget}
    suite = Suite(report, out, results_md, args.budget)
    report["matmul_peak_tflops_bf16"] = peak = matmul_peak_tflops(device, dtype, 256 if smoke else 8192)
    report["spec_peak_tflops_bf16"] = None if smoke else spec_peak(name)

    def kernels_so_far(partial: dict) -> None:  # the kernel section saves after each of its own parts
        report["kernels"] = partial
        suite.save()

    # most valuable first: a run cut short still answers the main questions
    suite.run("kernels", lambda: gpu_kernels.run(smoke=smoke, sweep=False, compile_=True, progress=kernels_so_far))
    free(device)
    suite.run("semi_step", lambda: [
        semi_step(big, img, device, step_dtype, b=b_big, mu=5, iters=iters, peak_tflops=peak),
        semi_step(huge, img, device, step_dtype, b=2, mu=5, iters=iters, peak_tflops=peak)])
    free(device)
    suite.run("original_step", lambda: [original_step(big, img, device, step_dtype, b=b_big, mu=5, iters=iters),
                                        original_step(huge, img, device, step_dtype, b=2, mu=5, iters=iters)])
    free(device)
    report["speedup_over_original"] = {o["arch"]: o["step_ms"] / s["step_ms"]
                                       for o, s in zip(gpu_summary.steps(report, "original_step"),
                                                gpu_summary.steps(report, "semi_step"))}
    suite.run("semi_step_kernels", lambda: kernels_step_comparison(big, img, device, step_dtype, b_big, iters, peak))
    free(device)
    def compile_rows_so_far(rows: list[dict]) -> None:
        report["compile_step"] = list(rows)
        suite.save()

    suite.run("compile_step", lambda: compile_modes(huge, img, device, step_dtype, iters, peak, smoke,
                                                    progress=compile_rows_so_far))
    free(device)
    suite.run("compile", lambda: semi_step(big, img, device, step_dtype, b=b_big, mu=5, iters=iters,
                                           peak_tflops=peak, compile_backend="eager" if smoke else "inductor"))
    free(device)
    suite.run("attention_bf16", lambda: attention_agreement(big, img, device, dtype, batch=4 if smoke else 32))
    suite.run("forward", lambda: [
        forward_throughput(big, img, device, step_dtype, batch=8 if smoke else 256, iters=iters),
        forward_throughput(huge, img, device, step_dtype, batch=8 if smoke else 64, iters=iters)])
    free(device)
    suite.run("kernel_sweep", lambda: gpu_kernels.run(smoke=smoke, sweep=True, compile_=False)["rows"])
    free(device)
    cap = 2 if smoke else 128  # labelled; x 6 images per step with mu = 5
    search_iters = 1 if smoke else 3  # trials at large batches take seconds per step
    suite.run("largest_batch", lambda: [
        largest_batch(huge, img, device, step_dtype, 5, search_iters, peak, checkpointing=False, cap=cap,
                      deadline=suite.deadline),
        largest_batch(huge, img, device, step_dtype, 5, search_iters, peak, checkpointing=True, cap=cap,
                      deadline=suite.deadline)])
    report["finished"] = True
    suite.save()
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
