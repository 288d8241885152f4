"""Typed, validated configuration: TOML + `--section.key VALUE` overrides -> one Config per stage."""

from engine.config.sections import (
    AugmentConfig, CheckpointConfig, DataConfig, DistConfig, EmaConfig, EvalConfig, LoggingConfig,
    MaeConfig, ModelConfig, OptimConfig, ProfileConfig, RunConfig, ScheduleConfig, SemiConfig,
)
from engine.config.tree import Config, build_dataclass

LOADER = ("RunPlan", "dump_toml", "load_plan", "read_toml")


def __getattr__(name: str):
    """The loader on first use: it asks the table of stages (engine.stages.specs), whose modules import the
    sections above, so importing it here would run in a circle."""
    if name in LOADER:
        from engine.config import load  # lazy: import cycle through engine.stages.specs

        return getattr(load, name)
    raise AttributeError(f"module 'engine.config' has no attribute '{name}'")

__all__ = [
    "AugmentConfig", "CheckpointConfig", "Config", "DataConfig", "DistConfig", "EmaConfig",
    "EvalConfig", "LoggingConfig", "MaeConfig", "ModelConfig", "OptimConfig", "ProfileConfig", "RunConfig", "RunPlan",
    "ScheduleConfig", "SemiConfig", "build_dataclass", "dump_toml", "load_plan", "read_toml",
]
