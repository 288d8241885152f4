"""The ablation sweep's runs: what each one is (a variant at a label budget and seed, maybe another model
size), the engine command it becomes, and the loop that runs the unfinished ones one at a time with a
progress line each. Every run of a seed starts from that seed's one MAE pre-training (SWEEP/mae-seedN)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.ablations_table import run_record
from bench.ablations_variants import Variant
from engine.errors import EXIT_INTERRUPTED

ROOT = Path(__file__).resolve().parent.parent
QUIET = (("logging.progress", "false"), ("logging.tensorboard", "false"))


class RunFailed(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Run:
    variant: Variant
    budget: int
    seed: int
    arch: str = ""  # "" = the config's model.arch

    @property
    def name(self) -> str:
        return f"{self.variant.name}-l{self.budget}-s{self.seed}" + (f"-{self.arch}" if self.arch else "")


def mae_name(seed: int, arch: str) -> str:
    return f"mae-seed{seed}" + (f"-{arch}" if arch else "")


def seed_overrides(seed: int, arch: str) -> list[tuple[str, str]]:
    return [("run.seed", str(seed)), ("data.split_seed", str(seed))] + ([("model.arch", arch)] if arch else [])


def mae_overrides(seed: int, arch: str, common) -> list[tuple[str, str]]:
    return [("run.stages", "pretrain"), *seed_overrides(seed, arch), *QUIET, *common]


def run_overrides(run: Run, sweep: Path, common) -> list[tuple[str, str]]:
    init = sweep / mae_name(run.seed, run.arch) / "checkpoints" / "pretrain-final.pt"
    return [("run.stages", ",".join(run.variant.stages)), ("model.init", str(init)),
            ("data.labels_per_class", str(run.budget)), *seed_overrides(run.seed, run.arch), *QUIET, *common,
            *run.variant.overrides]


def plan_runs(variants: list[Variant], budgets: list[int], seeds: list[int], models: list[str], scaling_budget: int,
              cfg_arch: str) -> list[Run]:
    """Seed by seed (each MAE is used as soon as it exists), then the scaling runs the grid does not hold."""
    runs = [Run(v, b, s) for s in seeds for b in budgets for v in variants]
    for arch in models:
        runs += [Run(v, scaling_budget, s, "" if arch == cfg_arch else arch) for s in seeds for v in variants]
    return list({r.name: r for r in runs}.values())


def engine_command(cfg: Path, out: Path, overrides) -> list[str]:
    return [sys.executable, "-m", "engine.train", "--cfg", str(cfg), "--out", str(out),
            *(f"--{k}={v}" for k, v in overrides)]


def run_engine(cfg: Path, out: Path, overrides) -> None:
    """One engine run, its output appended to OUT/ablation.log. It runs in its own session, so a signal meant
    for the sweep (Ctrl-C, SIGTERM to the sweep or its process group) reaches it once, from here, as SIGTERM:
    it finishes its step, saves and exits 3 (a second signal would stop it unsaved)."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "ablation.log"
    with open(log, "a") as sink:
        proc = subprocess.Popen(engine_command(cfg, out, overrides), cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
    if code in (EXIT_INTERRUPTED, -signal.SIGINT, -signal.SIGTERM):
        raise KeyboardInterrupt
    if code:
        tail = "\n".join(log.read_text().splitlines()[-5:])
        raise RunFailed(f"the run in {out} failed (exit {code}); its log, {log}, ends:\n{tail}", code)


class Sweep:
    """Runs what is not finished yet, one at a time, with a progress line per run; `execute` is run_engine
    (the tests pass a fake)."""

    def __init__(self, cfg: Path, sweep: Path, common, execute: Callable = run_engine, cfg_arch: str = ""):
        self.cfg, self.sweep, self.common, self.execute, self.cfg_arch = cfg, sweep, common, execute, cfg_arch
        self.seconds: dict[str, list[float]] = {}  # wall seconds of this session's runs, by stages

    def run_dir(self, run: Run) -> Path:
        return self.sweep / "runs" / run.name

    def pending(self, runs: list[Run]) -> list[Run]:
        return [r for r in runs if not (self.run_dir(r) / "results.json").is_file()]

    def ensure_mae(self, seed: int, arch: str) -> None:
        out = self.sweep / mae_name(seed, arch)
        if (out / "results.json").is_file():
            return
        t0 = time.perf_counter()
        self.execute(self.cfg, out, mae_overrides(seed, arch, self.common))
        self.seconds.setdefault("mae", []).append(time.perf_counter() - t0)
        print(f"[mae] seed {seed}{f' {arch}' if arch else ''}: pre-trained in {time.perf_counter() - t0:.0f} s "
              f"({out})", flush=True)

    def record(self, run: Run) -> dict:
        about = {"name": run.name, "variant": run.variant.name, "budget": run.budget, "seed": run.seed,
                 "arch": run.arch or self.cfg_arch, "run_stages": list(run.variant.stages),
                 "overrides": [f"--{k}={v}" for k, v in run.variant.overrides], "run_dir": str(self.run_dir(run)),
                 "engine_overrides": [f"--{k}={v}" for k, v in run_overrides(run, self.sweep, self.common)]}
        record = run_record(self.run_dir(run), about, run.variant.scored)
        path = self.sweep / "results" / f"{run.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        return record

    def eta(self, left: list[Run], maes_left: int) -> float:
        every = [s for times in self.seconds.values() for s in times]
        if not every:
            return float("nan")

        def mean(key: str) -> float:  # this kind of run's mean so far, else every run's
            times = self.seconds.get(key, every)
            return sum(times) / len(times)

        return sum(mean(",".join(r.variant.stages)) for r in left) + maes_left * mean("mae")

    def run_all(self, runs: list[Run]) -> list[dict]:
        todo = {r.name for r in self.pending(runs)}
        records = []
        for i, run in enumerate(runs, 1):
            where = (f"[{i}/{len(runs)}] {run.variant.name:<12} labels/class {run.budget}  seed {run.seed}"
                     + (f"  {run.arch}" if run.arch else ""))
            if run.name not in todo:
                records.append(self.record(run))
                print(f"{where}  teacher top-1 {records[-1]['teacher_top1']:.1f} %  (finished earlier)", flush=True)
                continue
            self.ensure_mae(run.seed, run.arch)
            t0 = time.perf_counter()
            self.execute(self.cfg, self.run_dir(run), run_overrides(run, self.sweep, self.common))
            wall = time.perf_counter() - t0
            self.seconds.setdefault(",".join(run.variant.stages), []).append(wall)
            records.append(self.record(run))
            left = [r for r in runs[i:] if r.name in todo]
            maes_left = len({(r.seed, r.arch) for r in left
                             if not (self.sweep / mae_name(r.seed, r.arch) / "results.json").is_file()})
            print(f"{where}  teacher top-1 {records[-1]['teacher_top1']:.1f} %  {wall:.0f} s  "
                  f"ETA {self.eta(left, maes_left) / 60:.1f} min", flush=True)
        return records
