"""Pieces the fine-tune and semi stages share: the EMA teacher and labelled mixup."""

from __future__ import annotations

import copy
from typing import Iterator

import torch
from torch import nn

from engine.config import AugmentConfig
from engine.sharding import local
from kernels import MixedBatch, ema_tensors, ema_update, flatten_into_buffers, labelled_mixup


class EmaTeacher:
    """teacher <- decay * teacher + (1 - decay) * student over every float parameter and buffer at once."""

    def __init__(self, student: nn.Module, decay: float, init_state: dict | None = None):
        self.module = copy.deepcopy(student)
        if init_state is not None:
            self.module.load_state_dict(init_state)
        self.module.eval().requires_grad_(False)
        self.decay = decay
        self.student = student
        # The teacher lives in one flat buffer (its tensors are views), so the update streams through one
        # block of memory; under FSDP2 sharding later replaces them and refresh() takes the local shards.
        flatten_into_buffers(self.module)
        self.refresh()

    def refresh(self) -> None:
        """Parameters keep their identity through training, so the tensor lists are built once, and again
        after sharding replaced them (FSDP2: each rank's local shards, updated without communication)."""
        self._teacher = local(ema_tensors(self.module))
        self._student = local(ema_tensors(self.student))

    @torch.no_grad()
    def update(self) -> None:
        ema_update(self._teacher, self._student, self.decay)
        if hasattr(self.module, "reshard"):
            # FSDP2 keeps the root's all-gathered weights after a forward (a backward would free them; the
            # teacher has none): drop them, or the next forward would reuse weights from before this update.
            self.module.reshard()


def mix_labelled(images: torch.Tensor, labels: torch.Tensor, augment: AugmentConfig) -> MixedBatch:
    """Labelled mixup/cutmix (one lambda per batch), or the identity when both alphas are 0.
    The batch is donated (mixed in place where the kernel can): the loaders hand out fresh tensors
    and nothing reads the unmixed images afterwards."""
    return labelled_mixup(images, labels, mixup_alpha=augment.mixup, cutmix_alpha=augment.cutmix,
                          switch_prob=augment.switch_prob, donate=True)


def cycle(stream, first_batch: int) -> Iterator:
    """Endless batches of `stream` starting at global batch index `first_batch` (exact resume)."""
    per_epoch = len(stream)
    epoch, start = divmod(first_batch, per_epoch)
    while True:
        yield from stream.epoch(epoch, start)
        epoch, start = epoch + 1, 0
