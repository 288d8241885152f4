"""The method's claims, measured: python -m bench.ablations [--budgets 1 2 5] [--seeds 0 1 2] [--variant ...]

A grid of label budgets (data.labels_per_class) x variants x seeds on the embedded digits demo (or any
--cfg), each run a `python -m engine.train` subprocess, --jobs of them at a time. Each seed pre-trains MAE once
(SWEEP/mae-seedN) and every run of that seed starts from it (model.init); each seed and budget fine-tunes
once (SWEEP/finetune-lB-sN) for the variants that fine-tune as the recipe does, which then train only their
later stages from it (the supervised variant is that fine-tune). A seed sets run.seed and
data.split_seed: it changes the initialisation, the augmentation and which images are labelled. Rerunning
the same command continues a killed sweep: finished runs (results.json) are read, not redone, and an
unfinished run folder resumes. Writes SWEEP/runs/<run>/ (the engine's folders), SWEEP/results/<run>.json
(raw numbers per run), SWEEP/table.md, SWEEP/ablations.png, a copy of the JSON and the plot in
bench/results/ablations-<date>/, and the tables as a section of bench/RESULTS.md. docs/ablations.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import time
from datetime import date
from importlib.metadata import version
from pathlib import Path

import torch

from bench.ablations_sweep import ROOT, Run, RunFailed, Sweep, mae_overrides, plan_runs, run_overrides
from bench.ablations_table import budget_table, plot, replace_section, scaling_table
from bench.ablations_variants import Variant, parse_common, scaling_variants, select_variants, shares_finetune
from engine.config import load_plan
from engine.errors import EXIT_INTERRUPTED, EXIT_USAGE, UserError

DEMO = ROOT / "configs" / "digits.toml"
# --smoke: seconds, not minutes; every stage stops after a few steps and evaluates at least once.
SMOKE = (("schedule.max_steps", "6"), ("stages.semi.schedule.max_steps", "4"), ("eval.every_epochs", "1"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ablations", description=__doc__.splitlines()[0],
                                     epilog="docs/ablations.md: what each variant is, how to add one, what is written")
    parser.add_argument("--cfg", default=str(DEMO), help="recipe (default: the digits demo, configs/digits.toml)")
    parser.add_argument("--out", help="sweep folder (default: runs/ablations; --smoke: runs/ablations-smoke)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 5], help="labels per class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", help="built-in variants to run (default: all of them)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=--key=value[,--key=value...]",
                        help="an extra variant: config overrides of the recipe (repeatable)")
    parser.add_argument("--common", default="", metavar="--key=value[,...]",
                        help="overrides for every run of the sweep, the MAE pre-training included")
    parser.add_argument("--models", nargs="+", default=[], help="model-size scaling: these model.arch values...")
    parser.add_argument("--scaling-budget", type=int, default=2, help="...at this many labels per class")
    parser.add_argument("--scaling-variants", nargs="+", metavar="NAME",
                        help="...for these of the grid's variants (default: all of them)")
    parser.add_argument("--results-dir", help="copy of the raw JSON and the plot (default: "
                                              "bench/results/ablations-<date>; --smoke: SWEEP/copy)")
    parser.add_argument("--results-md", help="markdown file whose ablation section is replaced (default: "
                                             "bench/RESULTS.md; --smoke: SWEEP/RESULTS.md)")
    parser.add_argument("--jobs", type=int, help="runs at a time (default: one per CPU core when the runs train on "
                        "the CPU, each on one thread; 1 on a GPU)")
    parser.add_argument("--smoke", action="store_true",
                        help="a 2-run grid (2 labels/class; supervised, semivit; seed 0) of a few steps each")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.budgets, args.seeds, args.variants = [2], [0], args.variants or ["supervised", "semivit"]
    args.out = Path(args.out or ("runs/ablations-smoke" if args.smoke else "runs/ablations")).resolve()
    default_dir = args.out / "copy" if args.smoke else ROOT / "bench" / "results" / f"ablations-{date.today()}"
    args.results_dir = Path(args.results_dir).resolve() if args.results_dir else default_dir
    default_md = args.out / "RESULTS.md" if args.smoke else ROOT / "bench" / "RESULTS.md"
    args.results_md = Path(args.results_md).resolve() if args.results_md else default_md
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    return args


def parallel_runs(args, cfg_device: str, common) -> tuple[int, tuple[tuple[str, str], ...]]:
    """How many runs at a time and the overrides that share the CPU between them. On a CPU the cores go to
    separate runs, one thread each: what a run does on one thread anyway (start-up, evaluations, plots) then
    overlaps another run's steps (docs/ablations.md has the measured gain). On a GPU, one run at a time."""
    on_cpu = cfg_device == "cpu" or (cfg_device == "auto" and not torch.cuda.is_available())
    cores = os.cpu_count() or 1
    jobs = args.jobs or (cores if on_cpu else 1)
    if not on_cpu or any(key == "run.threads" for key, _ in common):
        return jobs, ()
    return jobs, (("run.threads", str(max(1, cores // jobs))),)


def check_inputs(args, variants: list[Variant], common) -> tuple[str, str]:
    """Every run's config loads before anything starts (a typo in the last variant is an exit 2 now, not
    an hour in); returns the config's model.arch and run.device."""
    cfg = Path(args.cfg)
    if not cfg.is_file():
        raise UserError(f"--cfg '{args.cfg}': no such file: give a TOML recipe (e.g. configs/digits.toml)")
    for flag, values in (("--budgets", args.budgets), ("--scaling-budget", [args.scaling_budget])):
        if any(b < 1 for b in values):
            raise UserError(f"{flag}: labels per class must be >= 1, got {values}")
    if any(s < 0 for s in args.seeds):
        raise UserError(f"--seeds: seeds must be >= 0, got {args.seeds}")
    base = load_plan(str(cfg), list(common)).base
    for arch in args.models or [""]:
        for variant in variants:
            run = Run(variant, args.budgets[0], args.seeds[0], arch)
            overrides = [kv for kv in run_overrides(run, args.out, common) if kv[0] != "model.init"]
            try:
                load_plan(str(cfg), overrides)
                load_plan(str(cfg), mae_overrides(run.seed, arch, common))
            except UserError as err:
                where = f"variant '{variant.name}'" + (f", --models {arch}" if arch else "")
                raise UserError(f"{where}: {err}") from None
    return base.model.arch, base.run.device


def machine() -> str:
    cpu = platform.processor() or "cpu"
    info = Path("/proc/cpuinfo")
    if info.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return f"{platform.machine()}, {os.cpu_count()} cores, {cpu}, torch {version('torch')}"


def write_outputs(args, records: list[dict], chosen: list[Variant], cfg_arch: str, scaling: list[Variant]) -> str:
    """The table, the plot and summary.json in the sweep folder, the copy, the RESULTS.md section."""
    variants = [v.name for v in chosen]
    grid = [r for r in records if r["arch"] == cfg_arch and r["budget"] in args.budgets]
    text = budget_table(grid, variants, args.budgets)
    if args.models:
        scaled = [r for r in records if r["budget"] == args.scaling_budget and r["arch"] in args.models]
        text += (f"\n\nModel size at {args.scaling_budget} labels per class:\n\n"
                 + scaling_table(scaled, [v.name for v in scaling], args.models))
    text += "\n\nVariants: " + "; ".join(f"`{v.name}`: {v.about}" for v in chosen) + "."
    (args.out / "table.md").write_text(text + "\n")
    figure = plot(grid, variants, args.budgets, args.out / "ablations.png")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    for record in records:
        shutil.copy(args.out / "results" / f"{record['name']}.json", args.results_dir / f"{record['name']}.json")
    shutil.copy(figure, args.results_dir / figure.name)
    command = " ".join(["python -m bench.ablations", *args.argv])
    summary = {"date": str(date.today()), "machine": machine(), "command": command, "table": text,
               "runs": [r["name"] for r in records]}
    (args.results_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    where = Path(os.path.relpath(args.results_dir, args.results_md.parent))
    replace_section(args.results_md, f"""## Ablations ({date.today()}, {machine()})

`{command}` (`{Path(args.cfg).name}`, seeds {' '.join(map(str, args.seeds))}):
teacher top-1 (%) on the held-out images, mean ± std over seeds; a run has collapsed when its teacher ended
more than 5 points below its own peak. Raw JSON per run: `{where}/`; the plot:
[{where}/{figure.name}]({where}/{figure.name}).

{text}""")
    return text


def stop(signum, frame) -> None:
    """SIGTERM (a job scheduler, kill) stops the sweep as Ctrl-C does: the current run saves and exits first."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, stop)
    try:
        args = parse_args(argv)
    except SystemExit as exit_:
        return EXIT_USAGE if exit_.code else 0
    try:
        common = (*parse_common(args.common), *(SMOKE if args.smoke else ()))
        variants = select_variants(args.variants, args.variant)
        cfg_arch, cfg_device = check_inputs(args, variants, common)
        jobs, threads = parallel_runs(args, cfg_device, common)
        scaling = scaling_variants(args.scaling_variants, variants)
        sharing = frozenset(v.name for v in variants if shares_finetune(args.cfg, v, common))
        runs = plan_runs(variants, args.budgets, args.seeds, args.models, args.scaling_budget, cfg_arch, scaling,
                         sharing)
        sweep = Sweep(Path(args.cfg).resolve(), args.out, (*common, *threads), cfg_arch=cfg_arch, jobs=jobs)
        print(f"{len(runs)} runs ({len(sweep.pending(runs))} to do) in {args.out}, {jobs} at a time"
              + (f" on {threads[0][1]} CPU thread(s) each" if threads else ""), flush=True)
        t0 = time.perf_counter()
        records = sweep.run_all(runs)
        print(write_outputs(args, records, variants, cfg_arch, scaling))
        print(f"sweep wall time {time.perf_counter() - t0:.0f} s; table {args.out / 'table.md'}, raw JSON "
              f"{args.results_dir}, section in {args.results_md}")
        return 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except RunFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue (finished runs are kept, the current one resumes)",
              file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
