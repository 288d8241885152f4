"""The config tree of one stage, and the strict dict -> dataclass conversion that builds it."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field

from engine.config.sections import (
    AugmentConfig,
    CheckpointConfig,
    DataConfig,
    DistConfig,
    EmaConfig,
    EvalConfig,
    LoggingConfig,
    MaeConfig,
    ModelConfig,
    OptimConfig,
    ProfileConfig,
    RunConfig,
    ScheduleConfig,
    SemiConfig,
    check,
)
from engine.errors import ConfigError


@dataclass
class Config:
    """Everything one stage needs. Each component receives its own section, never the whole tree."""

    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    semi: SemiConfig = field(default_factory=SemiConfig)
    mae: MaeConfig = field(default_factory=MaeConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def __post_init__(self):
        # Rules that span sections live here; single-section rules live in each section.
        unlabelled = self.semi.mu * self.data.batch_size
        check(not (self.semi.pseudo_mixup and unlabelled % 2), "semi.mu",
              f"pseudo mixup pairs samples, so the unlabelled batch (semi.mu * data.batch_size = "
              f"{self.semi.mu} * {self.data.batch_size} = {unlabelled}) must be even: change one of them, or set "
              f"semi.pseudo_mixup = false")
        check(self.data.source != "imagefolder" or bool(self.data.root), "data.root",
              "is empty: set it to the folder holding train/ and val/ (or use data.source = \"digits\")")
        check(len(self.data.mean) == self.model.in_chans, "data.mean",
              f"has {len(self.data.mean)} entries but model.in_chans = {self.model.in_chans}: give data.mean and "
              f"data.std one value per channel, or set --model.in_chans {len(self.data.mean)}")


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(value, tp, key: str):
    """Check a TOML value against a field's annotated type; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is types.UnionType:  # e.g. str | bool: any member's type; the section normalises it
        for member in typing.get_args(tp):
            try:
                return _coerce(value, member, key)
            except ConfigError:
                pass
        raise ConfigError(key, f"expected {' or '.join(_type_name(m) for m in typing.get_args(tp))}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list of {_type_name(item_tp)[3:]}s, got {value!r}")
        return [_coerce(v, item_tp, key) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    return value


def unknown_key_error(key: str, prefix: str, valid: list[str]) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    path = f"{prefix}.{key}" if prefix else key
    hint = f"; did you mean '{prefix + '.' if prefix else ''}{near[0]}'?" if near else \
        f"; valid keys: {', '.join(valid)}"
    return ConfigError(path, f"unknown key{hint}")


def build_dataclass(cls, data: dict, prefix: str = ""):
    """Build `cls` from a nested dict, strictly: unknown keys, wrong types and impossible values are errors."""
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"expected a table of settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise unknown_key_error(key, prefix, names)
    kwargs = {}
    for name, value in data.items():
        path = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_dataclass(tp, value, path)
        else:
            kwargs[name] = _coerce(value, tp, path)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(prefix) if prefix else err


def field_type(cls, path: list[str], full: str):
    """The annotated type of a dotted key inside `cls` (for parsing command-line values)."""
    for i, name in enumerate(path):
        hints = typing.get_type_hints(cls)
        if name not in hints:
            raise unknown_key_error(name, ".".join(full.split(".")[: len(full.split(".")) - len(path) + i]),
                                    list(hints))
        tp = hints[name]
        if i == len(path) - 1:
            return tp
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(full, f"'{name}' is a setting, not a section")
        cls = tp
    raise ConfigError(full, "names a section, not a setting")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
