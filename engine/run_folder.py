"""What a start does with an --out folder that already holds a run, decided on every rank before any work.

- no run there (no checkpoints, no results.json; a config.toml alone does not count): start afresh;
- an unfinished run (checkpoints, no results.json) whose config.toml equals this start's config: resume it,
  as `--checkpoint.resume auto` would. A requeued SLURM job or a `torchrun --max-restarts` restart reruns
  the same command, so this is what a cluster needs from the default;
- a finished run, or an unfinished one with another config: refused (UserError, exit 2), nothing touched;
- checkpoint.overwrite = true: the old run's files are removed (by the main rank) and the run starts afresh;
- an explicit checkpoint.resume (auto or a path) works as it always did.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from engine.checkpoint import remove
from engine.config import Config, RunPlan, load_plan
from engine.config.tree import to_dict
from engine.errors import UserError

# What a run writes into its folder: removed by checkpoint.overwrite (other files are left alone).
RUN_FILES = ("checkpoints", "results.json", "report.md", "model.safetensors", "metrics.jsonl", "tensorboard",
             "pseudo_labels.csv", "accuracy.png", "loss.png", "mask_rate.png", "reconstruction.png")
# Keys that say how to start or how fast to go, not what to train: they may differ between a run and its
# resumption (a sweep resumed with another --jobs gives each run another CPU thread count).
HOW_TO_START = ("checkpoint.resume", "checkpoint.overwrite", "run.threads")


@dataclass(frozen=True)
class Arrival:
    plan: RunPlan  # the plan to run (checkpoint.resume = "auto" when an unfinished run is taken up)
    note: str = ""  # the line the main rank prints, when there is something to say
    replace: bool = False  # remove the old run's files before starting


def arrive(plan: RunPlan, run_dir: Path) -> Arrival:
    configs = [plan.base, *plan.stages.values()]
    resume = next((c.checkpoint.resume for c in configs if c.checkpoint.resume), "")
    overwrite = any(c.checkpoint.overwrite for c in configs)
    if overwrite and resume:
        raise UserError(f"checkpoint.overwrite = true and checkpoint.resume = '{resume}' ask for opposite things: "
                        f"drop one of them")
    if resume:
        return Arrival(plan)
    checkpoints, finished = saved_checkpoints(run_dir), (run_dir / "results.json").is_file()
    if not checkpoints and not finished:
        return Arrival(plan)
    if overwrite:
        return Arrival(plan, f"run folder {run_dir}: checkpoint.overwrite = true: removing the run it held", True)
    if finished:
        raise refusal(run_dir, "a finished run (results.json)")
    differs = config_difference(plan, run_dir / "config.toml")
    if differs:
        raise refusal(run_dir, f"an unfinished run with another config ({differs})")
    return Arrival(resuming(plan), f"run folder {run_dir} holds an unfinished run of this config: resuming it "
                                   f"(as --checkpoint.resume auto)")


def refusal(run_dir: Path, what: str) -> UserError:
    return UserError(f"--out '{run_dir}' already holds {what}: continue it with --checkpoint.resume auto, start "
                     f"afresh with another --out, or replace it with --checkpoint.overwrite true")


def saved_checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if not p.name.startswith(".")]  # .NAME.tmp: a save that never completed


def config_difference(plan: RunPlan, saved_path: Path) -> str:
    """'' when the saved config trains exactly what `plan` does, else a short description of the difference."""
    if not saved_path.is_file():
        return "no config.toml"
    try:
        saved = load_plan(saved_path)
    except UserError as err:
        return f"its config.toml does not load: {err}"
    ours, theirs = comparable(plan), comparable(saved)
    if ours == theirs:
        return ""
    keys = differing_keys(ours, theirs)
    shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    return f"differs in {shown}" if keys else "differs"


def comparable(plan: RunPlan) -> dict:
    """The stages, in order, with their resolved configs as plain dicts, the start-up keys left out."""
    out = {}
    for name, cfg in plan.stages.items():
        tree = to_dict(cfg)
        for key in HOW_TO_START:
            section, name = key.split(".")
            tree[section].pop(name, None)
        out[name] = tree
    return {"order": list(plan.stages), "stages": out}


def differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in list(a) + [k for k in b if k not in a]:
        x, y = a.get(key), b.get(key)
        name = f"{prefix}{key}"
        if isinstance(x, dict) and isinstance(y, dict):
            keys += differing_keys(x, y, f"{name}.")
        elif x != y:
            keys.append(name)
    # the same key differing in several stages is one difference to the user
    plain = [k.split(".", 2)[2] if k.startswith("stages.") and k.count(".") >= 2 else k for k in keys]
    return list(dict.fromkeys(plain))


def resuming(plan: RunPlan) -> RunPlan:
    def auto(cfg: Config) -> Config:
        return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume="auto"))

    return dataclasses.replace(plan, base=auto(plan.base), stages={n: auto(c) for n, c in plan.stages.items()})


def remove_run(run_dir: Path) -> None:
    """The files a run writes (RUN_FILES), so that the new run's rolling checkpoints and logs start clean."""
    for name in RUN_FILES:
        remove(run_dir / name)

