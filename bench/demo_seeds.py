"""The demo's benchmark target, measured: python -m bench.demo_seeds [--seeds 0 1 2]

Runs the embedded digits demo (configs/digits.toml, every stage) once per seed, sequentially, and
prints, per seed, top-1 without pre-training (baseline), with MAE pre-training (finetune) and with
Semi-ViT on top (semi), their means and the wall time of each run. The raw numbers go to
bench/results/demo_seeds-<date>.json; --keep DIR keeps the run folders (DIR/seedN). Target (README):
Semi-ViT teacher >= 90 %, >= 10 points above supervised-only on the same 50 labels (mean of 3 seeds),
each run <= 5 minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

from bench.machine import cpu_label

ROOT = Path(__file__).resolve().parent.parent


def run_seed(seed: int, out: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "engine.train", "--out", str(out), "--run.seed", str(seed),
           "--logging.progress", "false", *overrides]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--keep", help="keep the run folders under this folder (default: deleted)")
    parser.add_argument("--tag", default="", help="appended to the result file's name (e.g. a variant's name)")
    args, overrides = parser.parse_known_args()  # the rest goes to engine.train, e.g. --run.compile step
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            r = run_seed(seed, Path(args.keep or tmp) / f"seed{seed}", overrides)
            s = r["stages"]
            rows.append({"seed": seed, "wall_seconds": r["wall_seconds"],
                         "baseline_top1": s.get("baseline", {}).get("top1"),
                         "baseline_teacher_top1": s.get("baseline", {}).get("teacher_top1"),
                         "supervised_top1": s["finetune"]["top1"],
                         "supervised_teacher_top1": s["finetune"].get("teacher_top1"),
                         "semi_top1": s["semi"]["top1"], "semi_teacher_top1": s["semi"]["teacher_top1"],
                         "stage_seconds": {k: v.get("seconds") for k, v in s.items()}})
            print(json.dumps(rows[-1]))
    keys = ["baseline_top1", "baseline_teacher_top1", "supervised_top1", "supervised_teacher_top1", "semi_top1",
            "semi_teacher_top1", "wall_seconds"]
    mean = {k: statistics.mean(r[k] for r in rows) for k in keys if all(r[k] is not None for r in rows)}
    # gains compare teachers (what each run deploys); the README's target compares against supervised-only
    gain = mean["semi_teacher_top1"] - mean["supervised_top1"]
    mae_gain = mean.get("supervised_teacher_top1", float("nan")) - mean.get("baseline_teacher_top1", float("nan"))
    semi_gain = mean["semi_teacher_top1"] - mean.get("supervised_teacher_top1", float("nan"))
    nan = float("nan")
    print(f"\nmean of {len(rows)} seeds (teacher top-1): no pre-training "
          f"{mean.get('baseline_teacher_top1', nan):.2f}%, MAE init {mean.get('supervised_teacher_top1', nan):.2f}% "
          f"({mae_gain:+.2f} points), Semi-ViT {mean['semi_teacher_top1']:.2f}% ({semi_gain:+.2f} points); "
          f"Semi-ViT teacher vs supervised student +{gain:.2f} points; "
          f"wall {mean['wall_seconds']:.1f} s per run (max {max(r['wall_seconds'] for r in rows):.1f} s)")
    result = {"date": str(date.today()), "machine": f"{platform.machine()}, {cpu_label()}",
              "torch": torch.__version__, "overrides": overrides, "runs": rows, "mean": mean,
              "gain_points": gain, "mae_gain_points": mae_gain, "semi_gain_points": semi_gain}
    out = ROOT / "bench" / "results" / f"demo_seeds-{date.today()}{'-' + args.tag if args.tag else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"raw results: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
