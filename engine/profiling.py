"""Named phases of a training step (NVTX ranges for Nsight Systems, record_function for torch.profiler)
and the step profiler behind `--profile.steps N`.

`phase(name)` returns a shared no-op context unless profiling is on, so the ranges cost a function call
and a flag test when off. The phases are the method's steps, so a timeline reads like the method.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

PHASES = ("data", "teacher_forward", "pseudo_label", "pseudo_mixup", "student_forward_backward", "compiled_step",
          "optimizer", "ema", "eval", "checkpoint")

_OFF = contextlib.nullcontext()


class _Switches:
    nvtx = False  # push NVTX ranges (profile.nvtx: for nsys)
    record = False  # torch.profiler record_function ranges (profile.steps > 0, while its window is open)
    sync = False  # synchronise the GPU when a range closes, so host ranges time execution (profiled steps only)


SWITCHES = _Switches()


class _Range:
    __slots__ = ("name", "nvtx", "record", "sync", "rf")

    def __init__(self, name: str):
        self.name = name
        # Read the switches once: they may flip between entering and leaving (end of the profiling window).
        self.nvtx, self.record, self.sync = SWITCHES.nvtx, SWITCHES.record, SWITCHES.sync
        self.rf = None

    def __enter__(self):
        if self.nvtx:
            torch.cuda.nvtx.range_push(self.name)
        if self.record:
            self.rf = torch.profiler.record_function(self.name)
            self.rf.__enter__()
        return self

    def __exit__(self, *exc):
        if self.sync:
            torch.cuda.synchronize()
        if self.rf is not None:
            self.rf.__exit__(*exc)
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        return False


def phase(name: str):
    """`with phase("ema"): ...`: a named range when profiling is on, nothing otherwise."""
    if not (SWITCHES.nvtx or SWITCHES.record) or torch.compiler.is_compiling():  # a compiled step is one range
        return _OFF
    return _Range(name)


def phase_table(events, steps: int) -> dict:
    """Mean ms per step and share of the step for each phase, from a profiler's events.

    The step is the profiler's own `ProfilerStep` range (one `prof.step()` to the next), so the
    phases and the step are timed independently; `other` is what no phase covers (loop bookkeeping).
    """
    host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]  # not GPU-side annotations
    step_us = [e.cpu_time_total for e in host if e.name.startswith("ProfilerStep")]  # "#k" or "*"
    n = len(step_us) or steps
    step_ms = sum(step_us) / 1e3 / max(n, 1)
    totals = {p: 0.0 for p in PHASES}
    for e in host:
        if e.name in totals:
            totals[e.name] += e.cpu_time_total / 1e3
    phases = {p: {"ms": round(t / n, 3), "share": round(t / n / step_ms, 4) if step_ms else 0.0}
              for p, t in totals.items() if t > 0}
    covered = sum(v["ms"] for v in phases.values())
    return {"steps": n, "step_ms": round(step_ms, 3), "phases": phases, "other_ms": round(step_ms - covered, 3)}


def format_table(table: dict) -> str:
    lines = ["| phase | mean ms per step | share of step |", "|---|---|---|"]
    for name, v in table["phases"].items():
        lines.append(f"| {name} | {v['ms']:.2f} | {100 * v['share']:.1f} % |")
    step = table["step_ms"]
    other = table["other_ms"]
    lines.append(f"| (not in a phase) | {other:.2f} | {100 * other / step if step else 0:.1f} % |")
    lines.append(f"| **step** | **{step:.2f}** | 100 % |")
    return "\n".join(lines)


class StepProfiler:
    """torch.profiler over `steps` training steps after `wait` + `warmup` ones; writes a Chrome trace and
    the per-phase table (profile/<stage>-trace.json, profile/<stage>-phases.json). Rank 0 only."""

    def __init__(self, steps: int, wait: int, warmup: int, run_dir: Path, stage: str, device: torch.device):
        self.steps, self.total = steps, wait + warmup + steps
        self.folder = Path(run_dir) / "profile"
        self.stage, self.device = stage, device
        self.count, self.table, self.trace = 0, None, None
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(
            activities=activities, on_trace_ready=self._ready,
            schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=steps, repeat=1))
        self.prof.start()
        SWITCHES.record = True
        SWITCHES.sync = device.type == "cuda"

    def step(self) -> None:
        """Call once after every optimizer step."""
        if self.count >= self.total:
            return
        self.prof.step()
        self.count += 1
        if self.count >= self.total:
            self.close()

    def _ready(self, prof) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.trace = self.folder / f"{self.stage}-trace.json"
        prof.export_chrome_trace(str(self.trace))
        self.table = phase_table(prof.events(), self.steps)
        self.table["trace"] = str(self.trace.relative_to(self.folder.parent))
        self.table["device"] = self.device.type
        (self.folder / f"{self.stage}-phases.json").write_text(json.dumps(self.table, indent=2) + "\n")
        print(f"[{self.stage}] profile of {self.table['steps']} steps (trace: {self.trace}):\n"
              f"{format_table(self.table)}")

    def close(self) -> None:
        if SWITCHES.record:
            SWITCHES.record = SWITCHES.sync = False
            self.prof.stop()
            if self.table is None:
                print(f"[{self.stage}] profile: the stage ended after {self.count} steps, before the profiler's "
                      f"window closed (profile.wait + profile.warmup + profile.steps = {self.total}): "
                      f"lower them or train longer")
