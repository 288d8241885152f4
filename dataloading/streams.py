"""What the trainer sees: BatchStream (one stream of batches, epoch by epoch) and StageData (a stage's streams)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol, runtime_checkable

from torch import Tensor

from engine.errors import UserError

# Stream ids: part of every seed, so two streams never share an order or an augmentation draw.
STREAM_IDS = {"labelled": 1, "unlabelled": 2, "evaluation": 3, "pretrain": 4}


@runtime_checkable
class BatchStream(Protocol):
    num_samples: int  # samples this stream covers (all ranks together)

    def __len__(self) -> int:
        """Batches per epoch for this rank (train streams drop the last partial batch; eval keeps it)."""

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, ...]]:
        """The batches of `epoch` from batch `start` on, on the stream's device. Deterministic given (seed,
        epoch, rank, world_size); train streams reshuffle every epoch, eval streams keep a fixed order.
        One live iterator per stream at a time (a new `epoch()` call abandons the previous one)."""


@dataclass
class StageData:
    num_classes: int
    in_chans: int
    labelled: BatchStream | None  # (images, labels): supervised view (fine-tune augmentation)
    unlabelled: BatchStream | None  # (weak, strong, true_labels): two independent views; -1 where unknown
    evaluation: BatchStream  # (images, labels): no augmentation, each sample once across ranks
    pretrain: BatchStream | None  # (images, labels): MAE view over labelled + unlabelled train images
    classes: list[str] = field(default_factory=list)  # class names, index = label


def check_need(need) -> set[str]:
    names = {need} if isinstance(need, str) else set(need)
    unknown = names - set(STREAM_IDS)
    if unknown:
        raise ValueError(f"need: unknown stream(s) {sorted(unknown)}; known: {list(STREAM_IDS)}")
    return names | {"evaluation"}


def check_batches(name: str, num_samples: int, batch_size: int, world_size: int) -> None:
    """A train stream must give every rank at least one full batch per epoch."""
    per_rank = num_samples // world_size
    if per_rank < batch_size:
        knob = "the unlabelled batch (semi.mu x data.batch_size)" if name == "unlabelled" else "data.batch_size"
        raise UserError(f"the {name} set has {num_samples} images: {per_rank} per process for {world_size} "
                        f"process(es), fewer than one batch of {batch_size}; lower {knob} or use more data")
