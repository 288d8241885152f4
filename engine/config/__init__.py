"""Typed, validated configuration: TOML + `--section.key VALUE` overrides -> one Config per stage."""

from engine.config.load import RunPlan, dump_toml, load_plan, read_toml
from engine.config.sections import (
    STAGES, AugmentConfig, CheckpointConfig, DataConfig, DistConfig, EmaConfig, EvalConfig, LoggingConfig,
    MaeConfig, ModelConfig, OptimConfig, ProfileConfig, RunConfig, ScheduleConfig, SemiConfig,
)
from engine.config.tree import Config, build_dataclass

__all__ = [
    "STAGES", "AugmentConfig", "CheckpointConfig", "Config", "DataConfig", "DistConfig", "EmaConfig",
    "EvalConfig", "LoggingConfig", "MaeConfig", "ModelConfig", "OptimConfig", "ProfileConfig", "RunConfig", "RunPlan",
    "ScheduleConfig", "SemiConfig", "build_dataclass", "dump_toml", "load_plan", "read_toml",
]
