"""Stage 2: supervised fine-tuning on the labelled subset (optionally with an EMA of the model)."""

from __future__ import annotations

from torch import nn

from engine.config import Config
from engine.stages.base import Stage
from engine.stages.common import EmaTeacher, mix_labelled
from kernels import soft_target_cross_entropy


class FinetuneStage(Stage):
    def __init__(self, cfg: Config, data, student: nn.Module, forward_model: nn.Module, name: str = "finetune"):
        self.name = name  # "baseline": the same recipe from random weights, for comparison
        self.cfg, self.data = cfg, data
        self.student, self.forward_model = student, forward_model
        self.ema = EmaTeacher(student, cfg.ema.decay) if cfg.ema.enabled else None
        self.eval_stream = data.evaluation

    @classmethod
    def for_run(cls, name: str, cfg: Config, data, student: nn.Module, forward_model: nn.Module, **_) -> Stage:
        return cls(cfg, data, student, forward_model, name=name)

    def micro_batches_per_epoch(self) -> int:
        return len(self.data.labelled)

    def batches(self, epoch: int, start: int):
        return iter(self.data.labelled.epoch(epoch, start))

    def loss(self, batch):
        images, labels = batch  # (B, C, H, W), (B,)
        mixed = mix_labelled(images, labels, self.cfg.augment)
        logits = self.forward_model(mixed.images)  # (B, classes)
        loss = soft_target_cross_entropy(logits, mixed.label_a, mixed.label_b, mixed.lam,
                                         smoothing=self.cfg.augment.smoothing)
        return loss, {"loss": loss.detach()}, images.shape[0]
