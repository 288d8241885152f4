"""The stages a run can list, one row each: what the engine asks about a stage, it asks here.

The runner builds a stage's data from `streams`, its model from `model` and runs it through `run`; the
config loader puts `config_base` beneath the file (and, with `config_from`, another stage's table);
preflight checks the folders and batch sizes of its streams; the dry run and its cost model count what
`model` and `cost` say; the report labels it and its gain from `report`. A new stage (say a linear probe)
is its own file plus one row of STAGE_SPECS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from engine.config import Config
from engine.models.build import build_model
from engine.models.mae import build_mae
from engine.stages import runner
from engine.stages.base import Stage
from engine.stages.finetune import FinetuneStage
from engine.stages.pretrain import PretrainStage
from engine.stages.semi import SemiStage


@dataclass(frozen=True)
class ModelKind:
    build: Callable[[Config], nn.Module]  # on the current default device (the dry run: meta)
    describe: Callable[[Config], str]  # one phrase for the dry run
    activations: str  # which of the cost model's formulas counts its saved tensors: "vit" | "mae"


def build_sincos_classifier(cfg: Config) -> nn.Module:
    """A fresh ViT with MAE's encoder init (xavier linears, as every fresh ViT here, and the sin-cos position
    table, learnable or not): a comparison that differs from the pre-trained path only in pre-training."""
    model = build_model(cfg.model)
    model.init_pos_embed("sincos")
    return model


CLASSIFIER = ModelKind(lambda cfg: build_model(cfg.model), lambda cfg: f"{cfg.model.global_pool} pool", "vit")
SINCOS_CLASSIFIER = ModelKind(build_sincos_classifier, CLASSIFIER.describe, "vit")
MAE = ModelKind(lambda cfg: build_mae(cfg.model, cfg.mae),
                lambda cfg: f"MAE, mask ratio {cfg.mae.mask_ratio}, decoder {cfg.mae.decoder_depth} x "
                            f"{cfg.mae.decoder_dim}", "mae")


@dataclass(frozen=True)
class CostRows:
    """What the cost model counts for one optimizer step besides the student's weights and forward."""

    teacher_forward: bool = False  # the EMA teacher's no-grad forward over the unlabelled images
    ema_row: str = ""  # the EMA's memory row ("" when the stage keeps none)
    ema_optional: bool = False  # the EMA exists only when ema.enabled


@dataclass(frozen=True)
class Gain:
    over: str  # the stage whose (teacher) top-1 this one's is compared with
    title: str
    needs: tuple[str, ...] = ()  # stages that must also be in the run for the comparison to mean it


@dataclass(frozen=True)
class ReportRow:
    label: str  # the stage's line in the comparison table
    label_beside: dict[str, str] = field(default_factory=dict)  # another label when that stage is in the run
    gain: Gain | None = None


@dataclass(frozen=True)
class StageSpec:
    name: str
    run: Callable  # (spec, cfg, rt, run_dir, carry) -> (summary, carry for the next stage)
    streams: tuple[str, ...]  # the data streams it reads (dataloading.build_data's `need`)
    epoch: str = ""  # the stream one epoch passes over (training stages)
    model: ModelKind = CLASSIFIER
    stage: type[Stage] | None = None  # the training stage's class
    trains: bool = False
    side_run: bool = False  # from random weights, for comparison: the next stage starts from what came before
    config_base: dict = field(default_factory=dict)  # defaults beneath the file (file and command line win)
    config_from: str = ""  # another stage whose [stages.X] table it is loaded on top of
    cost: CostRows = CostRows()
    report: ReportRow | None = None


# MAE pre-training: AdamW betas (0.9, 0.95), base lr 1.5e-4, no layer decay, 40 warm-up epochs, crops of
# 20-100 % of the image. "pseudo_label" writes the teacher's labels for the unlabelled pool.
STAGE_SPECS = {spec.name: spec for spec in (
    StageSpec("baseline", runner.train_stage, ("labelled", "evaluation"), "labelled", SINCOS_CLASSIFIER,
              FinetuneStage, trains=True, side_run=True, config_from="finetune",
              cost=CostRows(ema_row="EMA", ema_optional=True),
              report=ReportRow("supervised only, no pre-training")),
    StageSpec("pretrain", runner.train_stage, ("pretrain", "evaluation"), "pretrain", MAE, PretrainStage,
              trains=True, config_base={"optim": {"blr": 1.5e-4, "betas": [0.9, 0.95], "layer_decay": 1.0},
                                        "schedule": {"warmup_epochs": 40.0},
                                        "augment": {"crop_scale": [0.2, 1.0]}}),
    StageSpec("finetune", runner.train_stage, ("labelled", "evaluation"), "labelled", CLASSIFIER, FinetuneStage,
              trains=True, cost=CostRows(ema_row="EMA", ema_optional=True),
              report=ReportRow("supervised only (fine-tune)",
                               {"pretrain": "supervised only, MAE init", "baseline": "supervised only, MAE init"},
                               Gain("baseline", "MAE pre-training gain", needs=("pretrain",)))),
    StageSpec("semi", runner.train_stage, ("labelled", "unlabelled", "evaluation"), "unlabelled", CLASSIFIER,
              SemiStage, trains=True, cost=CostRows(teacher_forward=True, ema_row="EMA teacher"),
              report=ReportRow("Semi-ViT (semi)", gain=Gain("finetune", "semi-supervised gain"))),
    StageSpec("eval", runner.run_eval, ("evaluation",), report=ReportRow("evaluated checkpoint")),
    StageSpec("pseudo_label", runner.run_pseudo_label, ("unlabelled",)),
)}


def stage_spec(name: str) -> StageSpec:
    return STAGE_SPECS[name]


def per_process_batch(stream: str, cfg: Config) -> int:
    """Images per process and micro-step that `stream` delivers: mu x batch_size for the unlabelled one."""
    return cfg.semi.mu * cfg.data.batch_size if stream == "unlabelled" else cfg.data.batch_size
