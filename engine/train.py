"""The one entry point:
python -m engine.train [--cfg FILE] [--out DIR] [--dry-run [--dry-run-gpu GPU]] [--section.key VALUE ...]

With no --cfg it runs the embedded demo (configs/digits.toml). An --out that holds an unfinished run of the
same config resumes it; one that holds a finished run, or a run of another config, is refused
(engine.run_folder). Exit codes: 0 done, 2 bad input (config, paths, data, checkpoints, a folder or disk that
cannot be written, a folder that holds another run; nothing lost), 3 interrupted by SIGTERM/SIGINT after saving,
1 another rank hung or died (one line names the collective). docs/distributed.md, "When things go wrong", lists
every failure.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from engine.config import RunPlan, load_plan
from engine.dryrun import dry_run
from engine.errors import EXIT_INTERRUPTED, EXIT_RANK_FAILED, EXIT_USAGE, Interrupted, RankFailure, UserError
from engine.session import run_plan

DEMO = Path(__file__).resolve().parent.parent / "configs" / "digits.toml"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
    parser = argparse.ArgumentParser(
        prog="python -m engine.train",
        description="Train Semi-ViT: MAE pre-training, supervised fine-tuning, semi-supervised fine-tuning.",
        epilog="Any config key can be overridden: --section.key VALUE (e.g. --optim.blr 1e-3, "
               "--stages.semi.schedule.epochs 10). Exit codes: 0 ok, 2 bad input, 3 interrupted.")
    parser.add_argument("--cfg", help="TOML recipe (default: the embedded digits demo, configs/digits.toml)")
    parser.add_argument("--out", help="run folder (default: runs/<name>-<timestamp>); one that holds an unfinished "
                                      "run of this config resumes it, another run there is refused "
                                      "(--checkpoint.overwrite true replaces it)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the model on the meta device and print its size, cost, batches and lr; no training")
    parser.add_argument("--dry-run-gpu", default=None, metavar="GPU",
                        help="GPU the dry run's memory, FLOPs and time are for: h100-80gb (default), a100-40gb, "
                             "a100-80gb, h200")
    args, rest = parser.parse_known_args(argv)
    return args, parse_overrides(rest, parser)


def parse_overrides(rest: list[str], parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    overrides, i = [], 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--") or "." not in token:
            parser.error(f"unrecognised argument '{token}': overrides look like --section.key VALUE")
        if "=" in token:
            key, value = token[2:].split("=", 1)
            i += 1
        elif i + 1 < len(rest):
            key, value = token[2:], rest[i + 1]
            i += 2
        else:
            parser.error(f"'{token}' needs a value")
        overrides.append((key, value))
    return overrides


def run_folder(plan: RunPlan, out: str | None) -> Path:
    if out:
        return Path(out)
    name = plan.base.run.name or Path(plan.source).stem
    return Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


def main(argv: list[str] | None = None) -> int:
    try:
        args, overrides = parse_args(argv)
    except SystemExit as exit_:  # argparse already printed the problem
        return EXIT_USAGE if exit_.code else 0
    cfg_path = args.cfg
    if cfg_path is None:
        cfg_path = str(DEMO)
        print(f"no --cfg given: running the embedded demo, {DEMO.relative_to(DEMO.parent.parent)} "
              f"(scikit-learn digits, all stages, CPU-friendly)")
    try:
        if args.dry_run_gpu and not args.dry_run:
            raise UserError("--dry-run-gpu only applies to a dry run: add --dry-run")
        plan = load_plan(cfg_path, overrides)
        if args.dry_run:
            print(dry_run(plan, args.dry_run_gpu) if args.dry_run_gpu else dry_run(plan))
            return 0
        run_plan(plan, run_folder(plan, args.out))
        return 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:  # a log, report or export that could not be written (checkpoints say more)
        where = f" '{err.filename}'" if err.filename else ""
        print(f"error: input/output failed{where}: {err.strerror or err}; checkpoints already saved are intact: "
              f"fix it and rerun with --checkpoint.resume auto --out <the same folder>", file=sys.stderr)
        return EXIT_USAGE
    except RankFailure as err:  # another rank hung or died: the line names the collective and what to check
        print(f"error: {err}", file=sys.stderr)
        return EXIT_RANK_FAILED
    except (KeyboardInterrupt, Interrupted) as err:
        print(f"interrupted: {err}; resume with --checkpoint.resume auto --out <the same folder>", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
