"""Stage 2: supervised fine-tuning on the labelled subset (optionally with an EMA of the model)."""

from __future__ import annotations

from torch import nn

from engine.config import Config
from engine.stages.common import EmaTeacher, mix_labelled
from kernels import soft_target_cross_entropy


class FinetuneStage:
    def __init__(self, cfg: Config, data, student: nn.Module, forward_model: nn.Module, name: str = "finetune"):
        self.name = name  # "baseline": the same recipe from random weights, for comparison
        self.cfg, self.data = cfg, data
        self.student, self.forward_model = student, forward_model
        self.ema = EmaTeacher(student, cfg.ema.decay) if cfg.ema.enabled else None
        self.teacher = self.ema.module if self.ema else None
        self.eval_stream = data.evaluation

    def micro_batches_per_epoch(self) -> int:
        return len(self.data.labelled)

    def batches(self, epoch: int, start: int):
        return iter(self.data.labelled.epoch(epoch, start))

    def prepare(self, batch):
        return batch  # nothing runs without gradients before the forward

    def loss(self, batch):
        images, labels = batch  # (B, C, H, W), (B,)
        mixed = mix_labelled(images, labels, self.cfg.augment)
        logits = self.forward_model(mixed.images)  # (B, classes)
        loss = soft_target_cross_entropy(logits, mixed.label_a, mixed.label_b, mixed.lam,
                                         smoothing=self.cfg.augment.smoothing)
        return loss, {"loss": loss.detach()}, images.shape[0]

    def after_step(self) -> None:
        if self.ema:
            self.ema.update()

    def derive(self, record: dict) -> dict:
        return record

    def eval_models(self) -> dict[str, nn.Module]:
        models = {"student": self.student}
        if self.teacher is not None:
            models["teacher"] = self.teacher
        return models

    def state_dict(self) -> dict:
        return {"ema": self.teacher.state_dict()} if self.teacher is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.teacher is not None and "ema" in state:
            self.teacher.load_state_dict(state["ema"])

    @property
    def handoff(self) -> dict:
        """What the next stage starts from: the weights and, when kept, their EMA."""
        out = {"model": self.student.state_dict()}
        if self.teacher is not None:
            out["ema"] = self.teacher.state_dict()
        return out

