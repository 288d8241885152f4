"""Stage 1: MAE self-supervised pre-training (mask 75% of the patches, reconstruct their pixels).

This stage evaluates with `evaluate(rt)` (masked reconstruction loss on the evaluation stream,
always the same masks) instead of top-1; `score` = -recon_loss picks the best checkpoint. The next stage
receives only the encoder (`handoff`), with timm / MAE key names.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from engine.config import Config
from engine.models.mae import DECODER_KEYS
from engine.models.mae_viz import reconstruction_grid
from engine.runtime import Runtime
from engine.sharding import full_state_dict
from engine.stages.base import Stage

EVAL_MASK_SEED = 1234  # the evaluation masks never change between evaluations (per rank: + rank)


class PretrainStage(Stage):
    name = "pretrain"

    def __init__(self, cfg: Config, data, student: nn.Module, forward_model: nn.Module,
                 viz_dir: Path | None = None):
        if data.pretrain is None:
            raise ValueError("PretrainStage needs the 'pretrain' stream: build the data with need=('pretrain',)")
        self.cfg, self.data = cfg, data
        self.student, self.forward_model = student, forward_model  # student: the MaskedAutoencoder
        self.eval_stream = data.evaluation
        self.viz_dir = Path(viz_dir) if viz_dir is not None else None  # where evaluate() saves a picture
        self.evaluations = 0

    @classmethod
    def for_run(cls, name: str, cfg: Config, data, student: nn.Module, forward_model: nn.Module, *,
                run_dir: Path, **_) -> Stage:
        return cls(cfg, data, student, forward_model, viz_dir=run_dir)

    def micro_batches_per_epoch(self) -> int:
        return len(self.data.pretrain)

    def batches(self, epoch: int, start: int):
        return iter(self.data.pretrain.epoch(epoch, start))

    def loss(self, batch):
        images, _ = batch  # (B, C, H, W); labels are not used
        loss, _, _ = self.forward_model(images)  # masks drawn from the (per-rank, resumable) torch RNG
        return loss, {"loss": loss.detach()}, images.shape[0]

    def eval_models(self) -> dict[str, nn.Module]:
        return {}  # no classifier to score: evaluate() measures the reconstruction instead

    @torch.no_grad()
    def evaluate(self, rt: Runtime) -> dict[str, float]:
        """Mean masked reconstruction loss over the evaluation stream with fixed masks; one host sync."""
        model = self.student
        was_training = model.training
        model.eval()
        gen = torch.Generator(device=rt.device)
        gen.manual_seed(EVAL_MASK_SEED + rt.rank)
        totals = torch.zeros(2, device=rt.device, dtype=torch.float64)  # (loss x images, images)
        first = None
        for images, _ in self.eval_stream.epoch(0):
            with rt.autocast():
                loss, _, _ = model(images, generator=gen)
            # every image has the same number of masked patches: the batch-size-weighted mean is the patch mean
            totals[0] += loss.double() * images.shape[0]
            totals[1] += images.shape[0]
            if first is None:
                first = images
        model.train(was_training)
        loss_sum, count = rt.all_reduce_sum(totals).tolist()
        recon = loss_sum / max(count, 1.0)
        if self.viz_dir is not None and rt.is_main and first is not None:
            gen.manual_seed(EVAL_MASK_SEED)
            reconstruction_grid(model, first, self.viz_dir / "reconstruction.png",
                                generator=gen, mean=self.cfg.data.mean, std=self.cfg.data.std)
        self.evaluations += 1
        return {"recon_loss": recon, "score": -recon}

    @property
    def handoff(self) -> dict:
        """What fine-tuning starts from: the encoder only (no mask token, no decoder), unsharded."""
        return {"model": {k: v for k, v in full_state_dict(self.student).items() if not k.startswith(DECODER_KEYS)}}
