"""TOML file + command-line overrides -> one validated Config per stage.

Precedence: command line > TOML > dataclass defaults. Per-stage differences live under
`[stages.<stage>.<section>]` and override the top-level sections for that stage only, e.g.

    [optim]
    blr = 1e-3
    [stages.finetune.optim]
    blr = 5e-4        # fine-tune uses 5e-4, every other stage 1e-3

Every stage is resolved and validated up front, so a bad value in the last stage fails at start-up.
"""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass
from pathlib import Path

from dataloading.textfile import read_text
from engine.config.sections import one_of
from engine.config.tree import Config, build_dataclass, field_type, to_dict, unknown_key_error
from engine.errors import ConfigError, UserError
from engine.stages.specs import STAGE_SPECS


@dataclass
class RunPlan:
    """What one invocation will do: the resolved config of every stage, in order."""

    source: str  # the config file it came from
    base: Config  # top-level sections (no stage overrides)
    stages: dict[str, Config]  # stage name -> resolved config, in run order

    def to_toml(self) -> str:
        """Every value spelled out: the base tree, then per stage only what differs from it, so that
        loading the file gives back exactly these stage configs."""
        tree = to_dict(self.base)
        tables = {}
        # a stage loaded on top of another's table (the baseline: fine-tune's) is written relative to it
        for name, cfg in sorted(self.stages.items(), key=lambda item: bool(STAGE_SPECS[item[0]].config_from)):
            config_from = STAGE_SPECS[name].config_from
            beneath = deep_merge(tree, tables.get(config_from, {})) if config_from else tree
            diff = dict_diff(to_dict(cfg), beneath)
            if diff:
                tables[name] = diff
        if tables:
            tree["stages"] = tables
        return dump_toml(tree)


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"config file '{path}' not found: pass an existing file to --cfg (see configs/)")
    text = read_text(path, "--cfg")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: invalid TOML: {err}; fix the file at that line (TOML syntax: key = value, "
                        f"[section] headers, quoted strings)") from None


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def dict_diff(new: dict, old: dict) -> dict:
    """The parts of `new` that differ from `old` (nested)."""
    out = {}
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            sub = dict_diff(value, old[key])
            if sub:
                out[key] = sub
        elif old.get(key) != value:
            out[key] = value
    return out


def parse_value(text: str, tp, key: str):
    """A command-line string -> a value of the field's type (errors name the flag)."""
    import typing

    flag = f"(from --{key})"
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        if text.strip().startswith("["):
            try:
                items = tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError:
                raise ConfigError(key, f"could not read {text!r} as a list {flag}") from None
            return [parse_value(str(v).lower() if isinstance(v, bool) else str(v), item_tp, key) for v in items]
        return [parse_value(part.strip(), item_tp, key) for part in text.split(",") if part.strip()]
    if tp is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(key, f"expected true or false, got {text!r} {flag}")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            kind = "an integer" if tp is int else "a number"
            raise ConfigError(key, f"expected {kind}, got {text!r} {flag}") from None
    return text


def apply_override(tree: dict, key: str, text: str) -> None:
    """Set `--a.b.c VALUE` into the nested dict, typed by the Config field it names."""
    parts = key.split(".")
    if parts[0] == "stages":
        if len(parts) < 4:
            raise ConfigError(key, "stage overrides look like --stages.<stage>.<section>.<key> VALUE")
        if parts[1] not in STAGE_SPECS:
            raise unknown_key_error(parts[1], "stages", list(STAGE_SPECS))
        tp = field_type(Config, parts[2:], key)
    else:
        if len(parts) < 2:
            raise ConfigError(key, "overrides look like --<section>.<key> VALUE, e.g. --optim.blr 1e-3")
        tp = field_type(Config, parts, key)
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(key, f"'{part}' is a setting in the file, not a section")
    node[parts[-1]] = parse_value(text, tp, key)


def load_plan(path: str | Path, overrides: list[tuple[str, str]] = ()) -> RunPlan:
    tree = read_toml(path)
    for key, text in overrides:
        apply_override(tree, key, text)
    stage_tables = tree.pop("stages", {})
    if not isinstance(stage_tables, dict):
        raise ConfigError("stages", "must be a table of per-stage overrides, e.g. [stages.semi.optim]")
    for name in stage_tables:
        if name not in STAGE_SPECS:
            raise unknown_key_error(name, "stages", list(STAGE_SPECS))
    base = build_dataclass(Config, tree)
    check_stage_names(base.run.stages)
    stages = {}
    for name in base.run.stages:
        spec = STAGE_SPECS[name]
        # beneath the file: the stage's own defaults (e.g. MAE's optimizer), then the table it is built on
        merged = deep_merge(spec.config_base, tree)
        if spec.config_from:  # the baseline: the fine-tune recipe, from random weights
            merged = deep_merge(merged, stage_tables.get(spec.config_from, {}))
        merged = deep_merge(merged, stage_tables.get(name, {}))
        try:
            stages[name] = build_dataclass(Config, merged)
        except ConfigError as err:
            # Name the stage table when the bad value came from it.
            raise (err.under(f"stages.{name}") if _from_stage(err.key, stage_tables.get(name, {})) else err)
    return RunPlan(source=str(path), base=base, stages=stages)


def check_stage_names(names: list[str]) -> None:
    """run.stages lists only stages of the table (engine.stages.specs)."""
    for name in names:
        try:
            one_of("stages", name, tuple(STAGE_SPECS))
        except ConfigError as err:
            raise err.under("run") from None


def _from_stage(key: str, table: dict) -> bool:
    node = table
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def dump_toml(tree: dict) -> str:
    """A small TOML writer for the value types configs use (tables, scalars, lists of scalars)."""

    def scalar(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines: list[str] = []

    def table(node: dict, prefix: str) -> None:
        plain = {k: v for k, v in node.items() if not isinstance(v, dict)}
        if prefix and plain:
            lines.append(f"\n[{prefix}]")
        for k, v in plain.items():
            lines.append(f"{k} = {scalar(v)}")
        for k, v in node.items():
            if isinstance(v, dict):
                table(v, f"{prefix}.{k}" if prefix else k)

    table(tree, "")
    return "\n".join(lines).lstrip("\n") + "\n"
