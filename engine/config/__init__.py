"""Typed, validated configuration: TOML + `--section.key VALUE` overrides -> one Config per stage.

The sections and the Config tree are the project's bottom layer (they import nothing above it). The loader
(engine.config.load) sits a layer higher, so its names load on first use: importing a section never runs it.
"""

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
)
from engine.config.tree import Config, build_dataclass

_FROM_LOAD = ("RunPlan", "dump_toml", "load_plan", "read_toml")

__all__ = [
    "AugmentConfig", "CheckpointConfig", "Config", "DataConfig", "DistConfig", "EmaConfig",
    "EvalConfig", "LoggingConfig", "MaeConfig", "ModelConfig", "OptimConfig", "ProfileConfig", "RunConfig", "RunPlan",
    "ScheduleConfig", "SemiConfig", "build_dataclass", "dump_toml", "load_plan", "read_toml",
]


def __getattr__(name: str):
    if name in _FROM_LOAD:
        from engine.config import load  # lazy: the loader sits above the bottom layer

        return getattr(load, name)
    raise AttributeError(f"module 'engine.config' has no attribute '{name}'")
