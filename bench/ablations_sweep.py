"""The ablation sweep's runs: what each one is (a variant at a label budget and seed, maybe another model
size), the engine command it becomes, and the loop that runs the unfinished ones, --jobs at a time, with a
progress line each. Every run of a seed starts from that seed's one MAE pre-training (SWEEP/mae-seedN); a
run whose variant fine-tunes as the recipe does starts from the one fine-tune of its seed and budget
(SWEEP/finetune-lB-sN, itself from the MAE) and trains only its later stages: the supervised variant is that
fine-tune. Starting a stage from the previous stage's final checkpoint or from its file is the same start
(weights, EMA teacher, and the seeds each stage sets), so sharing changes no number, only the time."""

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
    shares_finetune: bool = False  # starts from FineTune(budget, seed, arch) instead of fine-tuning itself

    @property
    def name(self) -> str:
        return f"{self.variant.name}-l{self.budget}-s{self.seed}" + (f"-{self.arch}" if self.arch else "")

    @property
    def mae(self) -> Mae:
        """The MAE pre-training this run (or its shared fine-tune) starts from."""
        return Mae(self.seed, self.arch)

    @property
    def finetune(self) -> FineTune:
        return FineTune(self.budget, self.seed, self.arch)

    @property
    def start(self) -> Mae | FineTune:
        """What must be finished before this run can start."""
        return self.finetune if self.shares_finetune else self.mae

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages this run trains itself (none: the variant is the shared fine-tune)."""
        return self.variant.stages[1:] if self.shares_finetune else self.variant.stages


def mae_name(seed: int, arch: str) -> str:
    return f"mae-seed{seed}" + (f"-{arch}" if arch else "")


def seed_overrides(seed: int, arch: str) -> list[tuple[str, str]]:
    return [("run.seed", str(seed)), ("data.split_seed", str(seed))] + ([("model.arch", arch)] if arch else [])


def mae_overrides(seed: int, arch: str, common) -> list[tuple[str, str]]:
    return [("run.stages", "pretrain"), *seed_overrides(seed, arch), *QUIET, *common]


def mae_checkpoint(sweep: Path, mae: Mae) -> Path:
    return sweep / mae.name / "checkpoints" / "pretrain-final.pt"


def finetune_overrides(finetune: FineTune, sweep: Path, common) -> list[tuple[str, str]]:
    return [("run.stages", "finetune"), ("model.init", str(mae_checkpoint(sweep, finetune.mae))),
            ("data.labels_per_class", str(finetune.budget)), *seed_overrides(finetune.seed, finetune.arch), *QUIET,
            *common]


def run_overrides(run: Run, sweep: Path, common) -> list[tuple[str, str]]:
    """The engine command of a run that trains; one with no stage of its own is its shared fine-tune's."""
    if run.shares_finetune and not run.stages:
        return finetune_overrides(run.finetune, sweep, common)
    init = (sweep / run.finetune.name / "checkpoints" / "finetune-final.pt" if run.shares_finetune
            else mae_checkpoint(sweep, run.mae))
    return [("run.stages", ",".join(run.stages)), ("model.init", str(init)),
            ("data.labels_per_class", str(run.budget)), *seed_overrides(run.seed, run.arch), *QUIET, *common,
            *run.variant.overrides]


def plan_runs(variants: list[Variant], budgets: list[int], seeds: list[int], models: list[str], scaling_budget: int,
              cfg_arch: str, scaling: list[Variant] | None = None, sharing: frozenset[str] = frozenset()) -> list[Run]:
    """Seed by seed (each MAE is used as soon as it exists), then the scaling runs the grid does not hold
    (`scaling`: their variants, default the grid's); the variants named in `sharing` start from the shared
    fine-tune (ablations_variants.shares_finetune)."""
    def run(v: Variant, budget: int, seed: int, arch: str = "") -> Run:
        return Run(v, budget, seed, arch, shares_finetune=v.name in sharing)

    runs = [run(v, b, s) for s in seeds for b in budgets for v in variants]
    for arch in models:
        runs += [run(v, scaling_budget, s, "" if arch == cfg_arch else arch) for s in seeds
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

    @property
    def start(self) -> None:
        return None


@dataclass(frozen=True)
class FineTune:
    """A seed's fine-tune at a label budget (and model size), from its MAE: the start of the runs that share it."""
    budget: int
    seed: int
    arch: str

    @property
    def name(self) -> str:
        return f"finetune-l{self.budget}-s{self.seed}" + (f"-{self.arch}" if self.arch else "")

    @property
    def mae(self) -> Mae:
        return Mae(self.seed, self.arch)

    @property
    def start(self) -> Mae:
        return self.mae


class Sweep:
    """Runs what is not finished yet, `jobs` at a time, a run as soon as what it starts from (its MAE or its
    shared fine-tune) is finished, with a progress line per finished run; `execute` is run_engine (the tests
    pass a fake)."""

    def __init__(self, cfg: Path, sweep: Path, common, execute: Callable = run_engine, cfg_arch: str = "",
                 jobs: int = 1):
        self.cfg, self.sweep, self.common, self.execute, self.cfg_arch = cfg, sweep, common, execute, cfg_arch
        self.jobs = jobs
        self.seconds: dict[str, list[float]] = {}  # wall seconds of this session's trainings, by stages

    def run_dir(self, run: Run) -> Path:
        """Its engine run folder; a run with no stage of its own reads its shared fine-tune's."""
        return self.sweep / run.finetune.name if run.shares_finetune and not run.stages else \
            self.sweep / "runs" / run.name

    def done(self, task: Run | FineTune | Mae) -> bool:
        folder = self.run_dir(task) if isinstance(task, Run) else self.sweep / task.name
        return (folder / "results.json").is_file()

    def pending(self, runs: list[Run]) -> list[Run]:
        return [r for r in runs if not self.done(r)]

    def record(self, run: Run) -> dict:
        about = {"name": run.name, "variant": run.variant.name, "budget": run.budget, "seed": run.seed,
                 "arch": run.arch or self.cfg_arch, "run_stages": list(run.variant.stages),
                 "overrides": [f"--{k}={v}" for k, v in run.variant.overrides], "run_dir": str(self.run_dir(run)),
                 "engine_overrides": [f"--{k}={v}" for k, v in run_overrides(run, self.sweep, self.common)],
                 "shared_finetune": str(self.sweep / run.finetune.name) if run.shares_finetune else None}
        record = run_record(self.run_dir(run), about, run.variant.scored)
        path = self.sweep / "results" / f"{run.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        return record

    def eta(self, left: list[Run]) -> float:
        """Seconds until the sweep ends: what is left, at this session's mean per kind of training, over the
        jobs."""
        every = [s for times in self.seconds.values() for s in times]
        if not every:
            return float("nan")

        def mean(key: str) -> float:  # this kind's mean so far, else every training's
            times = self.seconds.get(key, every)
            return sum(times) / len(times)

        starts = {r.start for r in left} | {r.mae for r in left}
        work = sum(mean(",".join(r.stages)) for r in left if r.stages)
        work += sum(mean(kind(t)) for t in starts if not self.done(t))
        return work / min(self.jobs, max(1, len(left)))

    def timed(self, task: Run | FineTune | Mae) -> float:
        t0 = time.perf_counter()
        if isinstance(task, Mae):
            self.execute(self.cfg, self.sweep / task.name, mae_overrides(task.seed, task.arch, self.common))
        elif isinstance(task, FineTune):
            self.execute(self.cfg, self.sweep / task.name, finetune_overrides(task, self.sweep, self.common))
        elif task.stages:  # else the run is its shared fine-tune, finished already
            self.execute(self.cfg, self.run_dir(task), run_overrides(task, self.sweep, self.common))
        return time.perf_counter() - t0

    def next_task(self, todo: list[Run], started: set[str]) -> Run | FineTune | Mae | None:
        """In plan order, the first run whose start is finished, else the first shared fine-tune whose MAE is,
        else the first MAE; nothing started already."""
        for run in todo:
            if run.name not in started and self.done(run.start):
                return run
        for start in [r.start for r in todo if isinstance(r.start, FineTune)] + [r.mae for r in todo]:
            if start.name not in started and not self.done(start) and (start.start is None or self.done(start.start)):
                return start
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
        running: dict[Future, Run | FineTune | Mae] = {}
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            try:
                while todo or running:
                    while len(running) < self.jobs and (task := self.next_task(todo, started)) is not None:
                        started.add(task.name)
                        running[pool.submit(self.timed, task)] = task
                    if not running:
                        raise RunFailed(f"nothing can start: {self.missing(todo[0])}", 1)
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    # an MAE or a fine-tune first: a run that started from it (its files are there before
                    # its future is seen) may have finished in the same wait
                    for future in sorted(finished, key=lambda f: isinstance(running[f], Run)):
                        task = running.pop(future)
                        wall = future.result()  # a failed run raises here
                        self.report(task, wall, todo, records, len(runs))
            except BaseException:
                stop_live_runs()  # Ctrl-C, SIGTERM or a failed run: the runs in progress save and stop
                wait(running)
                raise
        return [records[run.name] for run in runs]

    def missing(self, run: Run) -> str:
        """Which training ended without its results, so that `run` cannot start."""
        start = run.start
        while start.start is not None and not self.done(start.start):
            start = start.start
        return f"{start.name} ended without {self.sweep / start.name / 'results.json'}"

    def report(self, task: Run | FineTune | Mae, wall: float, todo: list[Run], records: dict, total: int) -> None:
        if not isinstance(task, Run):
            self.seconds.setdefault(kind(task), []).append(wall)
            what = "pre-trained" if isinstance(task, Mae) else f"fine-tuned on {task.budget} labels/class"
            print(f"[{kind(task)}] seed {task.seed}{f' {task.arch}' if task.arch else ''}: {what} in {wall:.0f} s "
                  f"({self.sweep / task.name})", flush=True)
            return
        if task.stages:
            self.seconds.setdefault(",".join(task.stages), []).append(wall)
            took = f"{wall:.0f} s"
        else:
            took = "its shared fine-tune"
        todo.remove(task)
        records[task.name] = self.record(task)
        print(f"[{len(records)}/{total}] {describe(task)}  teacher top-1 {records[task.name]['teacher_top1']:.1f} %  "
              f"{took}  ETA {self.eta(todo) / 60:.1f} min", flush=True)


def kind(task: FineTune | Mae) -> str:
    return "mae" if isinstance(task, Mae) else "finetune"


def describe(run: Run) -> str:
    return (f"{run.variant.name:<12} labels/class {run.budget}  seed {run.seed}"
            + (f"  {run.arch}" if run.arch else ""))
