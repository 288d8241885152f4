"""The ablation grid's variants: what each changes in the recipe, and the --variant syntax that adds one.

A variant is a name, the training stages it runs after the shared MAE pre-training (the last one is the
one scored) and config overrides. On the command line:

    --variant NAME=--key=value[,--key=value...]

e.g. `--variant strict=--semi.threshold=0.9,--semi.lambda_u=1`. Items are separated by a comma followed by
`--`, so a list value keeps its commas (`--augment.crop_scale=0.5,1.0`). `--run.stages=finetune` (or
`baseline`, `finetune,semi`, ...) picks the stages; without it a variant runs `finetune` then `semi`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.config import load_plan
from engine.errors import UserError

SYNTAX = "NAME=--key=value[,--key=value...], e.g. --variant strict=--semi.threshold=0.9,--semi.lambda_u=1"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # it names run folders
ITEM_SEPARATOR = re.compile(r",(?=--)")
RUN_STAGES = ("baseline", "finetune", "semi")  # pretrain is shared per seed; the others train nothing
SET_BY_THE_GRID = {"run.seed": "--seeds", "data.split_seed": "--seeds", "data.labels_per_class": "--budgets",
                   "model.init": "the shared MAE pre-training"}


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[tuple[str, str], ...] = ()
    stages: tuple[str, ...] = ("finetune", "semi")
    about: str = ""

    @property
    def scored(self) -> str:
        """The stage whose teacher top-1 the table shows."""
        return self.stages[-1]


def decay(value: str) -> Variant:
    return Variant(f"decay{value}", (("stages.semi.ema.decay", value),), about=f"Semi-ViT, teacher EMA decay {value}")


BUILT_IN = {v.name: v for v in (
    Variant("supervised", stages=("finetune",), about="supervised fine-tuning only (its EMA is scored)"),
    Variant("semivit", about="the recipe: EMA teacher, probabilistic pseudo mixup"),
    Variant("fixmatch", (("stages.semi.ema.decay", "0"),), about="FixMatch-style: teacher = the current student"),
    Variant("hard", (("stages.semi.semi.pseudo_mixup", "false"),),
            about="Semi-ViT with hard pseudo labels, no pseudo mixup"),
    decay("0.9"),
    decay("0.999"),
)}
DEFAULT = tuple(BUILT_IN)


def shares_finetune(cfg: str, variant: Variant, common) -> bool:
    """Whether `variant` fine-tunes exactly as the recipe does (its overrides leave the fine-tune stage's
    config as it is), so that its runs start from the sweep's shared fine-tune instead of repeating it. A
    change meant for a later stage shares only when scoped to that stage (--stages.semi.semi.threshold=0.9):
    a section's key (--semi.threshold=0.9) reaches every stage's config, whether the stage reads it or not."""
    if variant.stages[0] != "finetune":
        return False

    def finetune(overrides) -> object:
        return load_plan(cfg, [("run.stages", "finetune"), *common, *overrides]).stages["finetune"]

    return finetune(variant.overrides) == finetune(())


def problem(flag: str, text: str, what: str) -> UserError:
    return UserError(f"{flag} '{text}': {what}; write {SYNTAX}")


def parse_variant(text: str) -> Variant:
    """One --variant argument; every mistake raises UserError naming it and the fix."""
    name, sep, body = text.partition("=")
    name = name.strip()
    if not sep:
        raise problem("--variant", text, "no '=' after the name")
    if not NAME.match(name):
        raise problem("--variant", text, f"the name '{name}' must start with a letter or digit and hold only "
                                         f"letters, digits and . _ + - (it names run folders)")
    overrides, stages = parse_items("--variant", text, body)
    stages = stages or Variant(name).stages
    about = ", ".join([f"--{k}={v}" for k, v in overrides] + [f"stages {' '.join(stages)}"])
    return Variant(name, overrides, stages, about=about)


def parse_items(flag: str, text: str, body: str) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...] | None]:
    """The overrides of `--key=value,--key=value` and the stages its --run.stages names (None without one)."""
    overrides, stages = [], None
    for item in ITEM_SEPARATOR.split(body.strip()) if body.strip() else []:
        item = item.strip()
        key, eq, value = item[2:].partition("=")
        if not item.startswith("--") or "." not in key:
            raise problem(flag, text, f"'{item}' is not an override: each item looks like --section.key=value")
        if not eq:
            raise problem(flag, text, f"'{item}' has no value: write --{key}=VALUE")
        if key in SET_BY_THE_GRID:
            raise problem(flag, text, f"--{key} is set by the grid ({SET_BY_THE_GRID[key]}): leave it out")
        if key == "run.stages":
            stages = parse_stages(flag, text, value)
        else:
            overrides.append((key, value))
    return tuple(overrides), stages


def parse_stages(flag: str, text: str, value: str) -> tuple[str, ...]:
    names = tuple(s.strip().strip("'\"") for s in value.strip().strip("[]").split(",") if s.strip())
    wrong = [s for s in names if s not in RUN_STAGES]
    if not names or wrong:
        raise problem(flag, text, f"--run.stages={value}: a variant runs some of {', '.join(RUN_STAGES)} "
                                  f"(pre-training is shared per seed)")
    return names


def select_variants(names: list[str] | None, extra: list[str]) -> list[Variant]:
    """The built-in variants named by --variants (default: all), then every --variant, names unique."""
    unknown = [n for n in names or () if n not in BUILT_IN]
    if unknown:
        raise UserError(f"--variants: unknown variant(s) {', '.join(unknown)}: the built-in ones are "
                        f"{', '.join(BUILT_IN)}; add others with --variant NAME=--key=value[,--key=value...]")
    chosen = [BUILT_IN[n] for n in dict.fromkeys(names or DEFAULT)]
    for text in extra:
        variant = parse_variant(text)
        if variant.name in BUILT_IN or variant.name in {v.name for v in chosen}:
            raise problem("--variant", text, f"the name '{variant.name}' is taken (built-in: "
                                             f"{', '.join(BUILT_IN)}); choose another name")
        chosen.append(variant)
    return chosen


def scaling_variants(names: list[str] | None, chosen: list[Variant]) -> list[Variant]:
    """The variants of the model-size table (--scaling-variants): some of the grid's, default all of them."""
    by_name = {v.name: v for v in chosen}
    unknown = [n for n in names or () if n not in by_name]
    if unknown:
        raise UserError(f"--scaling-variants: {', '.join(unknown)} not in the grid's variants "
                        f"({', '.join(by_name)}): name some of those")
    return [by_name[n] for n in dict.fromkeys(names)] if names else list(chosen)


def parse_common(text: str) -> tuple[tuple[str, str], ...]:
    """--common: overrides for every engine run of the sweep (the MAE pre-training too), in the same syntax."""
    overrides, stages = parse_items("--common", text, text)
    if stages is not None:
        raise problem("--common", text, "--run.stages belongs to a variant (--variant NAME=--run.stages=...)")
    return overrides
