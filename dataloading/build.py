"""build_data / describe_data: the one entry point from a DataConfig + AugmentConfig to a stage's streams."""

from __future__ import annotations

import torch

from dataloading import digits
from dataloading.dali import resolve_loader  # re-exported: the engine asks build which loader runs
from dataloading.randaug import parse_randaug
from dataloading.streams import StageData, check_need
from engine.errors import UserError

__all__ = ["DEFAULT_NEED", "build_data", "describe_data", "resolve_loader"]

DEFAULT_NEED = ("labelled", "unlabelled", "evaluation")


def _source(data):
    if data.source == "digits":
        return digits
    if data.source == "imagefolder":
        from dataloading import imagefolder  # lazy: start-up cost (torchvision), which the digits never need
        return imagefolder
    raise UserError(f"data.source = '{data.source}' is unknown: use 'imagefolder' or 'digits'")


def build_data(data, augment, *, img_size: int, batch_size: int, unlabelled_batch_size: int, seed: int,
               rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
               need=DEFAULT_NEED) -> StageData:
    """The streams named in `need` (labelled, unlabelled, evaluation, pretrain; evaluation always), others
    None. Paths, index files, class counts and batch sizes are checked first: UserError before heavy work."""
    names = check_need(need)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
    if img_size <= 0:
        raise UserError(f"model.img_size must be > 0, got {img_size}")
    if batch_size <= 0 or ("unlabelled" in names and unlabelled_batch_size <= 0):
        raise UserError(f"batch sizes must be > 0, got data.batch_size = {batch_size} and an unlabelled batch of "
                        f"{unlabelled_batch_size}")
    parse_randaug(augment.randaug)  # a bad policy string fails here, before any scan
    return _source(data).build(data, augment, img_size=img_size, batch_size=batch_size,
                               unlabelled_batch_size=unlabelled_batch_size, seed=seed, rank=rank,
                               world_size=world_size, device=torch.device(device), need=names)


def describe_data(data) -> dict:
    """Sample counts {"num_classes", "labelled", "unlabelled", "evaluation", "pretrain"} without decoding
    anything (for --dry-run); UserError if the data is not there."""
    return _source(data).describe(data)
