"""run.host_memory on the CPU: the demo's semi step (augmentation, teacher, pseudo mixup, student forward and
backward, fused AdamW, EMA) with malloc keeping freed memory ("keep", engine/host_memory.py) against glibc's
defaults ("system"). malloc's setting is per process and cannot be undone, so each side is its own
interpreter on one thread. With two cores or more the two run at the same time, each pinned to a core, and
swap cores every round: both see the same machine (this one's speed drifts by tens of percent within
minutes), as two runs of the ablation sweep do. Prints both medians, the page faults per step and the ratio."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEP_MS = """
import os, resource, statistics, sys, time, torch
from engine import host_memory
from engine.config import load_plan
from engine.stages.standalone import stage_steps
mode, core, warm, timed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
host_memory.apply(mode, on_cpu=True)
if core >= 0:
    os.sched_setaffinity(0, {core})
torch.set_num_threads(1)
step = stage_steps(load_plan("configs/digits.toml", [("run.stages", "semi")]).stages["semi"], "semi", seed=0)
for _ in range(warm):
    step()
times, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(timed):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
print(statistics.median(times) * 1e3, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / timed)
"""


def start(mode: str, core: int, warm: int, timed: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", STEP_MS, mode, str(core), str(warm), str(timed)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen) -> tuple[float, float]:
    """The median step in ms and the page faults per step (the kernel zero-filling fresh memory)."""
    out, _ = proc.communicate()
    assert proc.returncode == 0, f"the timed process failed (exit {proc.returncode})"
    ms, faults = out.split()[-2:]
    return float(ms), float(faults)


def test_bench_host_memory_demo_semi_step(request):
    smoke = request.config.getoption("benchmark_disable", False)
    rounds, warm, timed = (1, 1, 1) if smoke else (4, 5, 30)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    side_by_side = len(cores) >= 2
    runs = {"keep": [], "system": []}
    for r in range(rounds):
        if side_by_side:  # the same seconds of the machine for both; cores swapped every round
            procs = {mode: start(mode, cores[(i + r) % 2], warm, timed) for i, mode in enumerate(runs)}
            for mode, proc in procs.items():
                runs[mode].append(result(proc))
        else:
            for mode in runs:
                runs[mode].append(result(start(mode, -1, warm, timed)))
    (keep, keep_faults), (system, system_faults) = (
        [statistics.median(column) for column in zip(*runs[mode])] for mode in ("keep", "system"))
    print(f"\ndemo semi step, 1 thread, {'side by side' if side_by_side else 'alternated'} (median of {rounds} "
          f"processes x {timed} steps): {keep:.1f} ms and {keep_faults:.0f} page faults per step with host_memory "
          f"keep, {system:.1f} ms and {system_faults:.0f} with system ({system / keep:.2f}x)")
