"""The ablation sweep's runs: what each one is (a variant at a label budget and seed, maybe another model
size), the engine command it becomes, and the loop that runs the unfinished ones one at a time with a
progress line each. Every run of a seed starts from that seed's one MAE pre-training (SWEEP/mae-seedN)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
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

    @property
    def mae(self) -> Mae:
        """The MAE pre-training this run starts from."""
        return Mae(self.seed, self.arch)


def mae_name(seed: int, arch: str) -> str:
    return f"mae-seed{seed}" + (f"-{arch}" if arch else "")


def seed_overrides(seed: int, arch: str) -> list[tuple[str, str]]:
    return [("run.seed", str(seed)), ("data.split_seed", str(seed))] + ([("model.arch", arch)] if arch else [])


def mae_overrides(seed: int, arch: str, common) -> list[tuple[str, str]]:
    return [("run.stages", "pretrain"), *seed_overrides(seed, arch), *QUIET, *common]


def run_overrides(run: Run, sweep: Path, common) -> list[tuple[str, str]]:
    init = sweep / run.mae.name / "checkpoints" / "pretrain-final.pt"
    return [("run.stages", ",".join(run.variant.stages)), ("model.init", str(init)),
            ("data.labels_per_class", str(run.budget)), *seed_overrides(run.seed, run.arch), *QUIET, *common,
            *run.variant.overrides]


def plan_runs(variants: list[Variant], budgets: list[int], seeds: list[int], models: list[str], scaling_budget: int,
              cfg_arch: str, scaling: list[Variant] | None = None) -> list[Run]:
    """Seed by seed (each MAE is used as soon as it exists), then the scaling runs the grid does not hold
    (`scaling`: their variants, default the grid's)."""
    runs = [Run(v, b, s) for s in seeds for b in budgets for v in variants]
    for arch in models:
        runs += [Run(v, scaling_budget, s, "" if arch == cfg_arch else arch) for s in seeds
                 for v in (variants if scaling is None else scaling)]
    return list({r.name: r for r in runs}.values())


def engine_command(cfg: Path, out: Path, overrides) -> list[str]:
    return [sys.executable, "-m", "engine.train", "--cfg", str(cfg), "--out", str(out),
            *(f"--{k}={v}" for k, v in overrides)]


LIVE: set[subprocess.Popen] = set()  # the engine runs in progress, stopped together on Ctrl-C / SIGTERM
LIVE_LOCK = threading.Lock()


def run_engine(cfg: Path, out: Path, overrides) -> None:
    """One engine run, its output appended to OUT/ablation.log. It runs in its own session, so a signal meant
    for the sweep (Ctrl-C, SIGTERM) does not reach it directly: the sweep passes it on once, as SIGTERM
    (stop_live_runs), and the run finishes its step, saves and exits 3 (a second signal would stop it unsaved)."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "ablation.log"
    with open(log, "a") as sink:
        proc = subprocess.Popen(engine_command(cfg, out, overrides), cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        with LIVE_LOCK:
            LIVE.add(proc)
        try:
            code = proc.wait()
        finally:
            with LIVE_LOCK:
                LIVE.discard(proc)
    if code in (EXIT_INTERRUPTED, -signal.SIGINT, -signal.SIGTERM):
        raise KeyboardInterrupt
    if code:
        tail = "\n".join(log.read_text().splitlines()[-5:])
        raise RunFailed(f"the run in {out} failed (exit {code}); its log, {log}, ends:\n{tail}", code)


def stop_live_runs() -> None:
    with LIVE_LOCK:
        for proc in LIVE:
            proc.terminate()


@dataclass(frozen=True)
class Mae:
    """A seed's MAE pre-training, which every run of that seed (and model size) waits for."""
    seed: int
    arch: str

    @property
    def name(self) -> str:
        return mae_name(self.seed, self.arch)


class Sweep:
    """Runs what is not finished yet, `jobs` at a time, a run as soon as its seed's MAE exists, with a progress
    line per finished run; `execute` is run_engine (the tests pass a fake)."""

    def __init__(self, cfg: Path, sweep: Path, common, execute: Callable = run_engine, cfg_arch: str = "",
                 jobs: int = 1):
        self.cfg, self.sweep, self.common, self.execute, self.cfg_arch = cfg, sweep, common, execute, cfg_arch
        self.jobs = jobs
        self.seconds: dict[str, list[float]] = {}  # wall seconds of this session's runs, by stages

    def run_dir(self, run: Run) -> Path:
        return self.sweep / "runs" / run.name

    def pending(self, runs: list[Run]) -> list[Run]:
        return [r for r in runs if not (self.run_dir(r) / "results.json").is_file()]

    def mae_done(self, mae: Mae) -> bool:
        return (self.sweep / mae.name / "results.json").is_file()

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
        """Seconds until the sweep ends: what is left, at this session's mean per kind of run, over the jobs."""
        every = [s for times in self.seconds.values() for s in times]
        if not every:
            return float("nan")

        def mean(key: str) -> float:  # this kind of run's mean so far, else every run's
            times = self.seconds.get(key, every)
            return sum(times) / len(times)

        work = sum(mean(",".join(r.variant.stages)) for r in left) + maes_left * mean("mae")
        return work / min(self.jobs, max(1, len(left)))

    def timed(self, task: Run | Mae) -> float:
        t0 = time.perf_counter()
        if isinstance(task, Mae):
            self.execute(self.cfg, self.sweep / task.name, mae_overrides(task.seed, task.arch, self.common))
        else:
            self.execute(self.cfg, self.run_dir(task), run_overrides(task, self.sweep, self.common))
        return time.perf_counter() - t0

    def next_task(self, todo: list[Run], started: set[str]) -> Run | Mae | None:
        """In plan order, the first run whose MAE is finished, else the first MAE not started yet."""
        for run in todo:
            mae = run.mae
            if run.name not in started and self.mae_done(mae):
                return run
        for run in todo:
            mae = run.mae
            if mae.name not in started and not self.mae_done(mae):
                return mae
        return None

    def run_all(self, runs: list[Run]) -> list[dict]:
        todo = self.pending(runs)
        records = {}
        for run in runs:
            if run not in todo:
                records[run.name] = self.record(run)
                print(f"[{len(records)}/{len(runs)}] {describe(run)}  teacher top-1 "
                      f"{records[run.name]['teacher_top1']:.1f} %  (finished earlier)", flush=True)
        started: set[str] = set()
        running: dict[Future, Run | Mae] = {}
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            try:
                while todo or running:
                    while len(running) < self.jobs and (task := self.next_task(todo, started)) is not None:
                        started.add(task.name)
                        running[pool.submit(self.timed, task)] = task
                    if not running:
                        raise RunFailed(f"nothing can start: the MAE pre-training of {todo[0].name} ended without "
                                        f"{self.sweep / todo[0].mae.name / 'results.json'}", 1)
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in finished:
                        task = running.pop(future)
                        wall = future.result()  # a failed run raises here
                        self.report(task, wall, todo, records, len(runs))
            except BaseException:
                stop_live_runs()  # Ctrl-C, SIGTERM or a failed run: the runs in progress save and stop
                wait(running)
                raise
        return [records[run.name] for run in runs]

    def report(self, task: Run | Mae, wall: float, todo: list[Run], records: dict, total: int) -> None:
        if isinstance(task, Mae):
            self.seconds.setdefault("mae", []).append(wall)
            print(f"[mae] seed {task.seed}{f' {task.arch}' if task.arch else ''}: pre-trained in {wall:.0f} s "
                  f"({self.sweep / task.name})", flush=True)
            return
        self.seconds.setdefault(",".join(task.variant.stages), []).append(wall)
        todo.remove(task)
        records[task.name] = self.record(task)
        maes_left = len({r.mae for r in todo if not self.mae_done(r.mae)})
        print(f"[{len(records)}/{total}] {describe(task)}  teacher top-1 {records[task.name]['teacher_top1']:.1f} %  "
              f"{wall:.0f} s  ETA {self.eta(todo, maes_left) / 60:.1f} min", flush=True)


def describe(run: Run) -> str:
    return (f"{run.variant.name:<12} labels/class {run.budget}  seed {run.seed}"
            + (f"  {run.arch}" if run.arch else ""))
