"""Start-up of the trainer: `import engine.train` as the command line does it, against the same import with
torch's compiler (torch._dynamo) and matplotlib loaded first, as engine.train did before it deferred them.
Prints both medians and the ratio; each import in a fresh interpreter, the two alternated."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOW = "import engine.train"
BEFORE = "import torch._dynamo, matplotlib.pyplot; import engine.train"


def seconds(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    return time.perf_counter() - t0


def test_bench_trainer_start_up(request):
    rounds = 1 if request.config.getoption("benchmark_disable", False) else 5
    times = {NOW: [], BEFORE: []}
    for _ in range(rounds):
        for code in times:
            times[code].append(seconds(code))
    now, before = statistics.median(times[NOW]), statistics.median(times[BEFORE])
    print(f"\nstart-up (median of {rounds}): {now:.2f} s now, {before:.2f} s with dynamo + matplotlib loaded "
          f"({before / now:.2f}x)")
