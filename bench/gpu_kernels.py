"""The prepared GPU check of the Triton kernels: python -m bench.gpu_kernels [--smoke] [--out FILE]

Options: --no-sweep, --no-compile (faster reruns), --ptx (compile for sm_90 only, no GPU needed).

For each op of ``kernels.triton_ops`` on CUDA: correctness against the ``*_reference`` spec on the GPU
(max abs diff), time (CUDA events around many iterations after a warm-up), achieved GB/s (the bytes
the op must move / time) against the measured device-to-device copy bandwidth (``dst.copy_(src)`` of
a 1 GiB buffer, 2 GiB moved), and the ratio; the same for the vectorised torch implementation.

    EMA          ViT-H/14 (392 tensors, 632M params), fp32 teacher with fp32 and bf16 students;
                 12 (10) bytes/param; target >= 85% of copy bandwidth; plus a small config sweep
    pseudo mixup 80 x 3 x 224 x 224 fp32 and bf16; 3 x the image bytes; target >= 80%; config sweep
    pseudo_label 1024 x 1000 and 1024 x 21841 (fp32, bf16); bytes = the logits (no target)
    soft CE      forward + backward, 80 x 1000 and 80 x 21841 (fp32, bf16); bytes = 3 x the logits
                 (no target)
    compile      torch.compile(fullgraph=True) (inductor on CUDA) of soft CE fwd+bwd, pseudo_label
                 and pseudo_mixup, compared with eager

Writes one JSON (device, date, versions, every row with ``target`` and ``meets_target``) to
``bench/results/gpu-kernels-<device>-<date>.json`` (or ``--out``) and prints it. ``run(smoke)`` is the
entry point for ``bench/gpu_suite.py``. ``--smoke`` (or no CUDA) runs the same code paths on the CPU
under the Triton interpreter with tiny sizes (set TRITON_INTERPRET=1 before Triton is first imported;
``main`` does it). Every section is guarded: an error is recorded in ``errors`` and the rest runs.

``ptx_check()`` compiles every kernel for sm_90 without a GPU (needs Triton NOT in interpreter mode)
and reports whether the hot paths use 16-byte vector loads and IEEE division/sqrt where the contract
needs exact box arithmetic; the tests run it in a subprocess.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import re
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

GIB = 2**30


# ------------------------------------------------------------------------------------------ timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call: CUDA events around ``iters`` calls after ``warmup`` calls (perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def timed_graph(fn, device: torch.device, calls: int, replays: int = 5) -> float:
    """Seconds per call of ``fn`` without launch overhead: ``calls`` calls captured in one CUDA graph,
    replayed ``replays`` times between CUDA events. The op must not sync or allocate host-visibly; it is
    warmed up (compiled, tables cached) on a side stream first, as capture requires."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / (replays * calls)
    del graph
    return seconds


def measure(fn, device: torch.device, iters: int, graph: bool = True) -> dict:
    """{"us_eager": back-to-back calls incl. launch overhead, "us_graph": the same in a CUDA graph (CUDA
    only; None when capture fails, with "graph_error"), "seconds": the graph time when there is one}."""
    eager = timed(fn, device, warmup=3, iters=iters)
    out = {"us_eager": eager * 1e6, "us_graph": None, "seconds": eager}
    if graph and device.type == "cuda":
        try:
            g = timed_graph(fn, device, calls=iters)
            out.update(us_graph=g * 1e6, seconds=g)
        except Exception as err:  # noqa: BLE001 (fall back to the eager time, say why)
            out["graph_error"] = f"{type(err).__name__}: {str(err)[:300]}"
            torch.cuda.synchronize(device)
    return out


def copy_bandwidth(device: torch.device, nbytes: int, iters: int) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write = 2 x nbytes per copy)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, warmup=2, iters=iters)
    return 2 * nbytes / seconds / 1e9


def _row(op: str, impl: str, shape: str, dtype: str, timing: dict, nbytes: int, copy_gbs: float,
         target: float | None, **extra) -> dict:
    """One result row; GB/s from the CUDA-graph time when there is one (the kernels' own speed), else
    from the eager back-to-back time."""
    seconds = timing["seconds"]
    gbs = nbytes / seconds / 1e9
    ratio = gbs / copy_gbs
    return {"op": op, "impl": impl, "shape": shape, "dtype": dtype, "us": seconds * 1e6,
            "us_eager": timing["us_eager"], "us_graph": timing["us_graph"], "bytes": nbytes, "gb_per_s": gbs,
            "copy_ratio": ratio, "target": target, "meets_target": None if target is None else bool(ratio >= target),
            **{k: v for k, v in timing.items() if k == "graph_error"}, **extra}


def _sweep(module_config: dict, settings: list[dict], fn, device, iters: int, nbytes: int, copy_gbs: float,
           reset=None) -> list[dict]:
    """Time ``fn`` under each setting of a kernel module's CONFIG (restored afterwards)."""
    default = dict(module_config)
    results = []
    if device.type != "cuda":  # smoke: one setting, to exercise the code
        settings = settings[:1]
    for setting in settings:
        module_config.update(setting)
        try:
            t = measure(fn, device, iters)
            results.append({**setting, "us": t["seconds"] * 1e6, "copy_ratio": nbytes / t["seconds"] / 1e9 / copy_gbs})
        except Exception as err:  # noqa: BLE001 (a config that does not compile is a result too)
            results.append({**setting, "error": f"{type(err).__name__}: {str(err)[:200]}"})
        finally:
            module_config.clear()
            module_config.update(default)
            if reset is not None:
                reset()
    return results


def _torch_call(fn, *args, **kwargs):
    """Call a public ``kernels`` function pinned to its torch implementation when it takes ``backend=``."""
    try:
        if "backend" in inspect.signature(fn).parameters:
            kwargs["backend"] = "torch"
    except (TypeError, ValueError):
        pass
    return fn(*args, **kwargs)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# -------------------------------------------------------------------------------------------- EMA


def _ema_shapes(smoke: bool) -> list[tuple[int, ...]]:
    if smoke:  # odd sizes, a few spanning several chunks
        return [(3,), (17, 5), (64,), (1000,), (33, 129), (7,), (9000,), (1,)]
    from engine.models import build_vit

    with torch.device("meta"):
        model = build_vit("vit_huge_patch14")
    tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    return [tuple(t.shape) for t in tensors]


def _torch_ema(teacher, student, decay):
    """The torch implementation (``kernels.ema.ema_update`` today): one ``_foreach_lerp_`` per group."""
    ss = [s if s.dtype == t.dtype else s.to(t.dtype) for t, s in zip(teacher, student)]
    torch._foreach_lerp_(teacher, ss, 1.0 - decay)


def bench_ema(device, copy_gbs: float, smoke: bool, sweep: bool = True) -> list[dict]:
    from kernels.ema import ema_update_reference
    from kernels.triton_ops import ema as tema

    shapes = _ema_shapes(smoke)
    n_params = sum(math.prod(s) for s in shapes)
    iters = 1 if smoke else 20
    gen = torch.Generator(device=device).manual_seed(0)
    teacher = [torch.randn(s, device=device, generator=gen) for s in shapes]
    student32 = [torch.randn(s, device=device, generator=gen) for s in shapes]
    rows = []
    decay = 0.9998
    for s_dtype in (torch.float32, torch.bfloat16):
        student = student32 if s_dtype == torch.float32 else [s.to(s_dtype) for s in student32]
        # correctness: one update from the same state, triton vs the reference, on copies
        ref = [t.clone() for t in teacher]
        out = [t.clone() for t in teacher]
        ema_update_reference(ref, student, decay)
        torch.ops.semivit_triton.ema_update_(out, student, decay)
        diff = torch.stack([(a - b).abs().max() for a, b in zip(out, ref)]).max().item()
        del ref, out
        tema.clear_cache()  # the table of the copies
        nbytes = n_params * (4 + 4 + student[0].element_size())
        shape = f"{len(shapes)} tensors, {n_params / 1e6:.1f}M params"
        dt = f"float32 <- {str(s_dtype).replace('torch.', '')}"

        def op():
            torch.ops.semivit_triton.ema_update_(teacher, student, decay)

        row = _row("ema_update_", "triton", shape, dt, measure(op, device, iters), nbytes, copy_gbs, 0.85,
                   max_abs_diff=diff, launches_per_update=1, config=dict(tema.CONFIG))
        if sweep and s_dtype == torch.float32:
            row["sweep"] = _sweep(tema.CONFIG, [
                {"block": 2048, "chunk": 2048, "num_warps": 4}, {"block": 4096, "chunk": 16384, "num_warps": 8},
                {"block": 1024, "chunk": 8192, "num_warps": 4}, {"block": 4096, "chunk": 4096, "num_warps": 4},
                {"block": 2048, "chunk": 32768, "num_warps": 4}, {"block": 8192, "chunk": 8192, "num_warps": 8},
            ], op, device, iters, nbytes, copy_gbs, reset=tema.clear_cache)
        rows.append(row)
        rows.append(_row("ema_update_", "torch (_foreach_lerp_)", shape, dt,
                         measure(lambda: _torch_ema(teacher, student, decay), device, iters), nbytes, copy_gbs, None))
    return rows


# ----------------------------------------------------------------------------------- pseudo mixup


def _draws(B: int, H: int, W: int, device, gen):
    """use_cutmix, cy, cx, partner (a random single B-cycle), drawn here so the bench does not depend
    on the signature of kernels.pseudo_mixup.draw_mix_randomness."""
    use_cutmix = torch.rand(B, device=device, generator=gen) < 0.5
    cy = torch.randint(0, H, (B,), device=device, generator=gen)
    cx = torch.randint(0, W, (B,), device=device, generator=gen)
    perm = torch.randperm(B, device=device, generator=gen)
    partner = torch.empty_like(perm).scatter_(0, perm, perm.roll(1))
    return use_cutmix, cy, cx, partner


def _torch_pseudo_mixup(images, prob, use_cutmix, cy, cx, partner, threshold):
    """The torch path (vectorised ``mix_batch`` of kernels/pseudo_mixup.py), lam 0.5 when p_i + p_j = 0."""
    from kernels.pseudo_mixup import mix_batch

    p_j = prob[partner]
    total = prob + p_j
    lam = torch.where(total == 0, 0.5, prob / torch.where(total == 0, 1.0, total))
    out, lam = _torch_call(mix_batch, images, lam, use_cutmix, cy, cx, partner)
    return out, lam, (torch.maximum(prob, p_j) >= threshold).float()


def bench_pseudo_mixup(device, copy_gbs: float, smoke: bool, sweep: bool = True) -> list[dict]:
    from kernels.pseudo_mixup import MixDraws, pseudo_mixup_reference
    from kernels.triton_ops import pseudo_mixup as tmix

    B, C, H, W = (4, 3, 13, 17) if smoke else (80, 3, 224, 224)
    iters = 1 if smoke else 50
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        images = torch.randn(B, C, H, W, device=device, generator=gen).to(dtype)
        prob = torch.rand(B, device=device, generator=gen)
        draws = _draws(B, H, W, device, gen)
        args = (images, prob, *draws, 0.7)
        out, lam, mask = torch.ops.semivit_triton.pseudo_mixup(*args)
        ref = pseudo_mixup_reference(images, prob, torch.arange(B, device=device), 0.7, draws=MixDraws(*draws))
        cut = draws[0]
        check = {"max_abs_diff": _maxdiff(out, ref.images), "lam_max_abs_diff": _maxdiff(lam, ref.lam),
                 "mask_equal": bool((mask == ref.mask).all()),
                 "cutmix_exact": bool((out[cut] == ref.images[cut]).all()), "n_cutmix": int(cut.sum())}
        nbytes = 3 * images.numel() * images.element_size()
        shape, dt = f"{B}x{C}x{H}x{W}", str(dtype).replace("torch.", "")

        def op():
            torch.ops.semivit_triton.pseudo_mixup(*args)

        row = _row("pseudo_mixup", "triton", shape, dt, measure(op, device, iters), nbytes, copy_gbs, 0.80, **check,
                   config=dict(tmix.CONFIG))
        if sweep:
            row["sweep"] = _sweep(tmix.CONFIG, [{"block": 1024, "num_warps": 4}, {"block": 4096, "num_warps": 8},
                                                {"block": 4096, "num_warps": 4}, {"block": 8192, "num_warps": 16},
                                                {"block": 2048, "num_warps": 4}],
                                  op, device, iters, nbytes, copy_gbs)
        rows.append(row)
        t_out = _torch_pseudo_mixup(*args)
        rows.append(_row("pseudo_mixup", "torch (mix_batch)", shape, dt,
                         measure(lambda: _torch_pseudo_mixup(*args), device, iters), nbytes, copy_gbs, None,
                         max_abs_diff=_maxdiff(t_out[0], ref.images)))
        del images, out, ref, t_out
    return rows


# ----------------------------------------------------------------------------------- pseudo label

_ROW_SWEEP = [{"block_c_large": 1024, "num_warps_large": 4}, {"block_c_large": 2048, "num_warps_large": 8},
              {"block_c_large": 4096, "num_warps_large": 16}, {"block_c_large": 8192, "num_warps_large": 16}]


def bench_pseudo_label(device, copy_gbs: float, smoke: bool, sweep: bool = True) -> list[dict]:
    from kernels.pseudo_label import pseudo_label, pseudo_label_reference
    from kernels.triton_ops import pseudo_label as tpl

    iters = 1 if smoke else 50
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for B, C in ((2, 1000), (2, 21841)) if smoke else ((1024, 1000), (1024, 21841)):
        for dtype in (torch.float32, torch.bfloat16):
            z = (torch.randn(B, C, device=device, generator=gen) * 4).to(dtype)
            prob, label, mask = torch.ops.semivit_triton.pseudo_label(z, 0.5)
            rp, rl, rm = pseudo_label_reference(z, 0.5)
            check = {"prob_max_abs_diff": _maxdiff(prob, rp), "label_agree": (label == rl).float().mean().item(),
                     "mask_agree": (mask == rm).float().mean().item()}
            nbytes = z.numel() * z.element_size()
            shape, dt = f"{B}x{C}", str(dtype).replace("torch.", "")

            def op():
                torch.ops.semivit_triton.pseudo_label(z, 0.5)

            row = _row("pseudo_label", "triton", shape, dt, measure(op, device, iters), nbytes, copy_gbs, None,
                       **check, config=dict(tpl.CONFIG))
            if sweep and C > tpl.CONFIG["large_c"] and dtype == torch.float32:
                row["sweep"] = _sweep(tpl.CONFIG, _ROW_SWEEP, op, device, iters, nbytes, copy_gbs)
            rows.append(row)
            rows.append(_row("pseudo_label", "torch", shape, dt,
                             measure(lambda: _torch_call(pseudo_label, z, 0.5), device, iters), nbytes, copy_gbs,
                             None))
    return rows


# --------------------------------------------------------------------------------------- soft CE


def bench_soft_ce(device, copy_gbs: float, smoke: bool, sweep: bool = True) -> list[dict]:
    from kernels.soft_target_ce import soft_target_cross_entropy, soft_target_cross_entropy_reference
    from kernels.triton_ops import soft_target_ce as tce

    iters = 1 if smoke else 50
    gen = torch.Generator(device=device).manual_seed(0)
    smoothing = 0.1
    rows = []
    for B, C in ((2, 1000), (2, 21841)) if smoke else ((80, 1000), (80, 21841)):
        for dtype in (torch.float32, torch.bfloat16):
            z = (torch.randn(B, C, device=device, generator=gen) * 3).to(dtype)
            a = torch.randint(0, C, (B,), device=device, generator=gen)
            b = torch.randint(0, C, (B,), device=device, generator=gen)
            lam = torch.rand(B, device=device, generator=gen)
            mask = (torch.rand(B, device=device, generator=gen) < 0.7).float()

            def triton_loss(zz):
                loss, _ = torch.ops.semivit_triton.soft_target_ce(zz, a, b, lam, mask, smoothing, True)
                return loss

            zr = z.detach().requires_grad_()
            ref = soft_target_cross_entropy_reference(zr, a, b, lam, mask, smoothing)
            ref.backward()
            zt = z.detach().requires_grad_()
            loss = triton_loss(zt)
            loss.backward()
            check = {"loss_abs_diff": abs(loss.item() - ref.item()), "grad_max_abs_diff": _maxdiff(zt.grad, zr.grad),
                     "grad_scale": zr.grad.abs().max().item()}
            # one launch reads z twice (the statistics sweep, then the gradient sweep) and writes the
            # float32 gradient; the backward reads it and writes the logits' dtype
            nbytes = 2 * z.numel() * z.element_size() + 4 * z.numel() * 2 + z.numel() * z.element_size()
            shape, dt = f"{B}x{C}", str(dtype).replace("torch.", "")
            one = torch.ones((), device=device)

            def raw_ops():
                _, grad = torch.ops.semivit_triton.soft_target_ce(z, a, b, lam, mask, smoothing, True)
                (grad * one).to(z.dtype)  # what the registered backward does

            row = _row("soft_target_ce fwd+bwd", "triton (ops)", shape, dt, measure(raw_ops, device, iters), nbytes,
                       copy_gbs, None, **check, config=dict(tce.CONFIG))
            if sweep and C > tce.CONFIG["large_c"] and dtype == torch.float32:
                row["sweep"] = _sweep(tce.CONFIG, _ROW_SWEEP, raw_ops, device, iters, nbytes, copy_gbs)
            rows.append(row)
            # autograd paths: eager only (a backward in a CUDA graph is a different measurement)
            rows.append(_row("soft_target_ce fwd+bwd", "triton (autograd, eager)", shape, dt,
                             measure(lambda: triton_loss(zt).backward(), device, iters, graph=False), nbytes,
                             copy_gbs, None))
            rows.append(_row("soft_target_ce fwd+bwd", "torch (autograd, eager)", shape, dt,
                             measure(lambda: _torch_call(soft_target_cross_entropy, zt, a, b, lam, mask,
                                                         smoothing).backward(), device, iters, graph=False),
                             nbytes, copy_gbs, None))
    return rows


# ---------------------------------------------------------------------------------------- compile


def compile_check(device, smoke: bool) -> dict:
    """torch.compile(fullgraph=True) of the triton_ops: inductor on CUDA, the eager backend on the CPU
    (the interpreter cannot run inside AOT tracing)."""
    backend = "eager" if device.type != "cuda" else "inductor"
    result = {"backend": backend}
    gen = torch.Generator(device=device).manual_seed(1)
    B, C = 8, 1000
    z = torch.randn(B, C, device=device, generator=gen)
    a = torch.randint(0, C, (B,), device=device, generator=gen)
    b = torch.randint(0, C, (B,), device=device, generator=gen)
    lam = torch.rand(B, device=device, generator=gen)

    def step(zz):
        loss, _ = torch.ops.semivit_triton.soft_target_ce(zz, a, b, lam, None, 0.1, True)
        loss.backward()
        return loss

    def fwd_bwd(zz):
        zz = zz.detach().requires_grad_()
        loss = torch.compile(lambda x: torch.ops.semivit_triton.soft_target_ce(x, a, b, lam, None, 0.1, True)[0],
                             fullgraph=True, backend=backend)(zz)
        loss.backward()
        return loss, zz.grad

    t0 = time.perf_counter()
    try:
        torch._dynamo.reset()
        loss_c, grad_c = fwd_bwd(z)
        ze = z.detach().requires_grad_()
        loss_e = step(ze)
        result["soft_target_ce"] = {"ok": True, "loss_abs_diff": abs(loss_c.item() - loss_e.item()),
                                    "grad_max_abs_diff": _maxdiff(grad_c, ze.grad)}
    except Exception as err:  # noqa: BLE001
        result["soft_target_ce"] = {"ok": False, "error": f"{type(err).__name__}: {str(err)[:500]}"}
    try:
        images = torch.randn(4, 3, 32, 32, device=device, generator=gen)
        prob = torch.rand(4, device=device, generator=gen)
        cut = torch.tensor([True, False, True, False], device=device)
        cy = torch.tensor([3, 5, 31, 0], device=device)
        cx = torch.tensor([0, 7, 31, 16], device=device)
        partner = torch.tensor([1, 2, 3, 0], device=device)

        def f(images, prob, logits):
            p, label, mask = torch.ops.semivit_triton.pseudo_label(logits, 0.5)
            mixed, lam, m2 = torch.ops.semivit_triton.pseudo_mixup(images, prob, cut, cy, cx, partner, 0.5)
            return p, label, mask, mixed, lam, m2

        eager = f(images, prob, z)
        compiled = torch.compile(f, fullgraph=True, backend=backend)(images, prob, z)
        result["pseudo_label+pseudo_mixup"] = {"ok": True, "max_abs_diff": max(_maxdiff(x, y) for x, y in
                                                                                zip(compiled, eager))}
    except Exception as err:  # noqa: BLE001
        result["pseudo_label+pseudo_mixup"] = {"ok": False, "error": f"{type(err).__name__}: {str(err)[:500]}"}
    result["seconds"] = time.perf_counter() - t0
    return result


# -------------------------------------------------------------------------------------- PTX check


def ptx_check() -> dict:
    """Compile every kernel for sm_90 without a GPU and look at the PTX. Run with TRITON_INTERPRET unset."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.triton_ops import ema, pseudo_label, pseudo_mixup, soft_target_ce

    if "constexprs" not in inspect.signature(ASTSource).parameters:
        return {"skipped": f"triton {triton.__version__}: ASTSource has no constexprs argument (needs triton >= 3.3)"}

    def compile_(fn, signature, constexprs, aligned, num_warps):
        names = list(inspect.signature(fn.fn if hasattr(fn, "fn") else fn).parameters)
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        src = ASTSource(fn=fn, signature={n: signature.get(n, "constexpr") for n in names}, constexprs=constexprs,
                        attrs=attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]
        pattern = r"\b((?:ld|st)\.global(?:\.\w+)*|sqrt\.\w+\.f64|div\.\w+\.f(?:32|64)|(?:div|rem)\.[su]32)"
        ops = re.findall(pattern, ptx)
        return {op: ops.count(op) for op in sorted(set(ops))}

    out = {"triton": triton.__version__}
    out["ema_fp32_bf16"] = compile_(ema._ema_kernel, {"table_ptr": "*i64", "n_tensors": "i32", "w": "fp32"},
                                    {"T_DTYPE": tl.float32, "S_DTYPE": tl.bfloat16, "BLOCK": 2048, "CHUNK": 8192,
                                     "ALIGNED": True}, ["table_ptr"], 4)
    mix_sig = {"x_ptr": "*bf16", "out_ptr": "*bf16", "w_ptr": "*fp32", "cut_ptr": "*i1", "cy_ptr": "*i64",
               "cx_ptr": "*i64", "partner_ptr": "*i64", "lam_out_ptr": "*fp32", "mask_out_ptr": "*fp32",
               "H": "i32", "W": "i32", "CH": "i32", "CHW": "i32", "threshold": "fp32"}
    out["mixup_bf16_224"] = compile_(pseudo_mixup._mix_kernel, mix_sig,
                                     {"PSEUDO": True, "F64": False, "BLOCK_H": 8, "BLOCK_W": 256},
                                     ["x_ptr", "out_ptr", "w_ptr", "lam_out_ptr", "mask_out_ptr", "H", "W", "CH",
                                      "CHW"],
                                     8)
    out["pseudo_label_bf16"] = compile_(pseudo_label._pseudo_label_kernel,
                                        {"z_ptr": "*bf16", "prob_ptr": "*fp32", "label_ptr": "*i64",
                                         "mask_ptr": "*fp32", "C": "i32", "threshold": "fp32"}, {"BLOCK_C": 1024},
                                        ["z_ptr", "C"], 4)
    ce_sig = {"z_ptr": "*fp32", "a_ptr": "*i64", "b_ptr": "*i64", "lam_ptr": "*fp32", "mask_ptr": "*fp32",
              "wce_ptr": "*fp32", "grad_ptr": "*fp32", "C": "i32", "inv_b": "fp32", "smoothing": "fp32",
              "uniform": "fp32"}
    out["soft_ce_fwd_fp32"] = compile_(soft_target_ce._soft_ce_kernel, ce_sig,
                                       {"HAS_MASK": True, "WITH_GRAD": False, "BLOCK_C": 1024}, ["z_ptr", "C"], 4)
    out["soft_ce_grad_bf16"] = compile_(soft_target_ce._soft_ce_kernel, {**ce_sig, "z_ptr": "*bf16"},
                                        {"HAS_MASK": False, "WITH_GRAD": True, "BLOCK_C": 1024},
                                        ["z_ptr", "grad_ptr", "C"], 4)
    # integer arguments equal to 1 are specialised as constexprs at launch: H = W = 1, C = 1 must compile
    mix_sig_1 = {k: v for k, v in mix_sig.items() if k not in ("H", "W", "CH", "CHW")}
    out["mixup_fp32_1x1"] = compile_(pseudo_mixup._mix_kernel, {**mix_sig_1, "x_ptr": "*fp32", "out_ptr": "*fp32"},
                                     {"PSEUDO": False, "F64": False, "BLOCK_H": 1024, "BLOCK_W": 1, "H": 1, "W": 1,
                                      "CH": 1, "CHW": 1}, [], 4)
    out["soft_ce_C1"] = compile_(soft_target_ce._soft_ce_kernel, {k: v for k, v in ce_sig.items() if k != "C"},
                                 {"HAS_MASK": True, "WITH_GRAD": True, "BLOCK_C": 16, "C": 1}, [], 4)
    out["pseudo_label_C1"] = compile_(pseudo_label._pseudo_label_kernel,
                                      {"z_ptr": "*fp32", "prob_ptr": "*fp32", "label_ptr": "*i64", "mask_ptr": "*fp32",
                                       "threshold": "fp32"}, {"BLOCK_C": 16, "C": 1}, [], 4)
    out["ema_one_tensor"] = compile_(ema._ema_kernel, {"table_ptr": "*i64", "w": "fp32"},
                                     {"T_DTYPE": tl.float32, "S_DTYPE": tl.float32, "BLOCK": 1024, "CHUNK": 1024,
                                      "ALIGNED": False, "n_tensors": 1}, [], 4)
    return out


# ------------------------------------------------------------------------------------------ driver


def run(smoke: bool, sweep: bool = True, compile_: bool = True, partial: Path | None = None,
        progress=None) -> dict:
    """Every check; returns the report. ``smoke``: tiny sizes, one iteration; on the CPU under the Triton
    interpreter when there is no CUDA device (or when TRITON_INTERPRET=1), else on the GPU.
    ``sweep=False`` skips the launch-config sweeps, ``compile_=False`` the torch.compile check;
    ``partial``: a file rewritten with the report so far after each section (kept if the run is killed);
    ``progress``: called with the report so far after each section (the GPU suite saves it)."""
    cuda = torch.cuda.is_available()
    smoke = smoke or not cuda
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # effective only if Triton was not imported yet
    from kernels import triton_ops

    device = torch.device("cuda" if cuda and not triton_ops.interpreted() else "cpu")
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (triton interpreter)",
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "smoke": smoke,
              "torch": torch.__version__, "python": platform.python_version(), "triton": None,
              "triton_status": triton_ops.status(), "rows": [], "errors": []}
    if not triton_ops.load():
        report["errors"].append(f"triton ops unavailable: {triton_ops.status()}")
        return report
    import triton

    report["triton"] = triton.__version__
    t0 = time.perf_counter()
    copy_gbs = copy_bandwidth(device, 2**20 if smoke else GIB, iters=1 if smoke else 10)
    if device.type == "cuda":
        report["copy_bytes"] = 2 * (2**20 if smoke else GIB)
    report["copy_gb_per_s"] = copy_gbs
    report["sweeps"] = sweep  # in smoke mode only the first setting of each sweep (the code path)
    for section in (bench_ema, bench_pseudo_mixup, bench_pseudo_label, bench_soft_ce):
        t1 = time.perf_counter()
        try:
            report["rows"] += section(device, copy_gbs, smoke, sweep)
        except Exception:  # noqa: BLE001 (record and go on: the device minutes are few)
            report["errors"].append(f"{section.__name__}: {traceback.format_exc()[-2000:]}")
        report.setdefault("section_seconds", {})[section.__name__] = time.perf_counter() - t1
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _write(partial, report, progress)
    if compile_:
        try:
            report["compile"] = compile_check(device, smoke)
        except Exception:  # noqa: BLE001
            report["errors"].append(f"compile_check: {traceback.format_exc()[-2000:]}")
    report["seconds"] = time.perf_counter() - t0
    report["summary"] = [
        f"{r['op']} [{r['impl']}] {r['shape']} {r['dtype']}: {r['us']:.1f} us, {r['gb_per_s']:.0f} GB/s = "
        f"{r['copy_ratio']:.0%} of copy" + ("" if r["target"] is None else
                                          f" (target {r['target']:.0%}: {'met' if r['meets_target'] else 'MISSED'})")
        for r in report["rows"]]
    _write(partial, report, progress)
    return report


def _write(path: Path | None, report: dict, progress=None) -> None:
    if progress is not None:
        progress(report)
    if path is not None:
        write_atomic(path, json.dumps(report, indent=2) + "\n")


def write_atomic(path: Path, text: str) -> None:
    """A reader (or a killed run) sees the previous file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="", help="JSON file (default bench/results/gpu-kernels-<device>-<date>.json)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU under the Triton interpreter")
    parser.add_argument("--no-sweep", action="store_true", help="skip the launch-config sweeps (faster)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile check (faster)")
    parser.add_argument("--ptx", action="store_true",
                        help="only compile the kernels for sm_90 and print the PTX summary")
    args = parser.parse_args(argv)
    if args.ptx:
        os.environ.pop("TRITON_INTERPRET", None)
        report = ptx_check()
        print(json.dumps(report, indent=2))
        return report
    cuda = torch.cuda.is_available()
    smoke = args.smoke or not cuda
    if cuda and "triton" not in sys.modules:
        os.environ.pop("TRITON_INTERPRET", None)  # never interpret on the GPU
    out = None
    if args.out or not smoke:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", torch.cuda.get_device_name() if cuda else "cpu")
        out = Path(args.out or f"bench/results/gpu-kernels-{name}-{stamp}.json")
    report = run(smoke, sweep=not args.no_sweep, compile_=not args.no_compile, partial=out)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
