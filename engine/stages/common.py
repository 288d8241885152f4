"""Pieces the fine-tune and semi stages share: the EMA teacher and labelled mixup."""

from __future__ import annotations

import copy
from typing import Iterator

import torch
from torch import nn

from engine.config import AugmentConfig
from kernels import MixedBatch, ema_tensors, ema_update, flatten_into_buffers, labelled_mixup


class EmaTeacher:
    """teacher <- decay * teacher + (1 - decay) * student over every float parameter and buffer at once."""

    def __init__(self, student: nn.Module, decay: float, init_state: dict | None = None):
        self.module = copy.deepcopy(student)
        if init_state is not None:
            self.module.load_state_dict(init_state)
        self.module.eval().requires_grad_(False)
        self.decay = decay
        # The teacher lives in one flat buffer (its tensors are views): the update streams through one
        # block of memory. Parameters keep their identity through training, so the lists are built once.
        self._teacher = flatten_into_buffers(self.module)
        self._student = ema_tensors(student)

    @torch.no_grad()
    def update(self) -> None:
        ema_update(self._teacher, self._student, self.decay)


def mix_labelled(images: torch.Tensor, labels: torch.Tensor, augment: AugmentConfig) -> MixedBatch:
    """Labelled mixup/cutmix (one lambda per batch), or the identity when both alphas are 0."""
    return labelled_mixup(images, labels, mixup_alpha=augment.mixup, cutmix_alpha=augment.cutmix,
                          switch_prob=augment.switch_prob)


def cycle(stream, first_batch: int) -> Iterator:
    """Endless batches of `stream` starting at global batch index `first_batch` (exact resume)."""
    per_epoch = len(stream)
    epoch, start = divmod(first_batch, per_epoch)
    while True:
        yield from stream.epoch(epoch, start)
        epoch, start = epoch + 1, 0
