"""The embedded demo source: scikit-learn's 8x8 digits (1797 images, 10 classes), held in memory.

- evaluation: a fixed stratified held-out split (`data.test_fraction`, seed 0, nothing else);
- labelled: `labels_per_class` (or `label_fraction`) per class of the remaining train split, by split_seed;
- unlabelled: every other train image, its true label kept (pseudo-label precision / recall);
- images: resized once to img_size (bilinear, antialias), 1 channel, values/16 normalised with data.mean/std,
  stored on `device`; batches are augmented there, batched (tensor_augment.py), seeded per batch from
  (seed, stream, epoch, rank, batch index), so `epoch(e, start=k)` reproduces the tail of `epoch(e)` exactly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dataloading.randaug import parse_randaug
from dataloading.sampler import ShardedSampler, derive_seed
from dataloading.splits import choose_split
from dataloading.streams import STREAM_IDS, StageData, check_batches
from dataloading.tensor_augment import TensorAugment
from engine.errors import UserError

NUM_CLASSES = 10
IN_CHANS = 1
TEST_SEED = 0  # the held-out split never moves


@functools.lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover
        raise UserError("data.source = 'digits' needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)  # (1797, 8, 8) in [0, 1], (1797,)


def preprocess(x: Tensor, img_size: int, mean, std) -> Tensor:
    """(N, 1, h, w) in [0, 1] -> (N, 1, img_size, img_size), resized (bilinear, antialias) and normalised:
    the evaluation view of the digits, also applied to image files by engine.predict."""
    x = F.interpolate(x.float(), size=(img_size, img_size), mode="bilinear", antialias=True, align_corners=False)
    m = torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
    return (x - m) / s


def unlabelled_pool(data, img_size: int) -> tuple[np.ndarray, Tensor, Tensor]:
    """(positions into load_digits(), images in the evaluation view, true labels) of the unlabelled split."""
    raw, targets = _load()
    ids = split_indices(data).unlabelled
    x = preprocess(torch.from_numpy(raw[ids]).unsqueeze(1), img_size, data.mean, data.std)
    return ids, x, torch.from_numpy(targets[ids])


@dataclass
class DigitsSplit:
    """Positions into load_digits() (sorted int64 arrays)."""
    train: np.ndarray
    test: np.ndarray
    labelled: np.ndarray
    unlabelled: np.ndarray


def split_indices(data) -> DigitsSplit:
    from sklearn.model_selection import train_test_split

    _, targets = _load()
    train, test = train_test_split(np.arange(len(targets)), test_size=data.test_fraction, stratify=targets,
                                   random_state=TEST_SEED)
    train, test = np.sort(train), np.sort(test)
    split = choose_split(targets[train], NUM_CLASSES, data, root=data.root)  # positions into `train`
    return DigitsSplit(train=train, test=test, labelled=train[split.labelled], unlabelled=train[split.unlabelled])


def describe(data) -> dict:
    s = split_indices(data)
    return {"num_classes": NUM_CLASSES, "labelled": len(s.labelled), "unlabelled": len(s.unlabelled),
            "evaluation": len(s.test), "pretrain": len(np.union1d(s.labelled, s.unlabelled))}


class TensorStream:
    """A BatchStream over in-memory tensors; `view(images, labels, generator)` makes the batch tuple."""

    def __init__(self, images: Tensor, labels: Tensor, sample_ids: np.ndarray, sampler: ShardedSampler,
                 view: Callable[[Tensor, Tensor, torch.Generator], tuple[Tensor, ...]], device: torch.device):
        self.images, self.labels = images, labels  # clean, normalised, on device
        self.sample_ids = sample_ids  # position of each sample in load_digits()
        self.sampler, self.view, self.device = sampler, view, device
        self.num_samples = sampler.num_samples
        self.corrupt_count = 0  # in-memory: nothing to decode

    def __len__(self) -> int:
        return len(self.sampler)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, ...]]:
        s = self.sampler
        shard = torch.as_tensor(s.shard(epoch), device=self.device)
        if not 0 <= start <= len(s):
            raise ValueError(f"start={start} is outside 0..{len(s)} (batches per epoch)")
        for b in range(start, len(s)):
            idx = shard[b * s.batch_size: (b + 1) * s.batch_size]
            g = torch.Generator(device=self.device)
            g.manual_seed(derive_seed(s.seed, s.stream, epoch, s.rank, b))
            yield self.view(self.images.index_select(0, idx), self.labels.index_select(0, idx), g)


def build(data, augment, *, img_size: int, batch_size: int, unlabelled_batch_size: int, seed: int, rank: int,
          world_size: int, device: torch.device, need: set[str]) -> StageData:
    if len(data.mean) != IN_CHANS:
        raise UserError(f"data.mean/std have {len(data.mean)} entries but the digits have {IN_CHANS} channel: "
                        f"set data.mean = [0.5] and data.std = [0.5] (and model.in_chans = 1)")
    policy = parse_randaug(augment.randaug)
    split = split_indices(data)
    if "unlabelled" in need:  # the labelled stream repeats itself when smaller than a batch
        check_batches("unlabelled", len(split.unlabelled), unlabelled_batch_size, world_size)
    pretrain_ids = np.union1d(split.labelled, split.unlabelled)
    if "pretrain" in need:
        check_batches("pretrain", len(pretrain_ids), batch_size, world_size)

    raw, targets = _load()
    images = preprocess(torch.from_numpy(raw).unsqueeze(1), img_size, data.mean, data.std).to(device)
    labels = torch.from_numpy(targets).to(device)
    aug = TensorAugment(data.mean, data.std, hflip=augment.hflip, reprob=augment.reprob, policy=policy,
                        device=device)

    def stream(name: str, ids: np.ndarray, bs: int, view, train: bool = True) -> TensorStream:
        sel = torch.as_tensor(ids, device=device)
        sampler = ShardedSampler(len(ids), bs, seed=seed, stream=STREAM_IDS[name], rank=rank,
                                 world_size=world_size, shuffle=train, drop_last=train, repeat=name == "labelled")
        return TensorStream(images.index_select(0, sel), labels.index_select(0, sel), ids, sampler, view, device)

    supervised = aug.strong if policy is not None else aug.weak
    return StageData(
        num_classes=NUM_CLASSES, in_chans=IN_CHANS, classes=[str(c) for c in range(NUM_CLASSES)],
        labelled=stream("labelled", split.labelled, batch_size, lambda x, y, g: (supervised(x, g), y))
        if "labelled" in need else None,
        unlabelled=stream("unlabelled", split.unlabelled, unlabelled_batch_size,
                          lambda x, y, g: (aug.weak(x, g), aug.strong(x, g), y)) if "unlabelled" in need else None,
        evaluation=stream("evaluation", split.test, data.eval_batch_size, lambda x, y, g: (x, y), train=False),
        pretrain=stream("pretrain", pretrain_ids, batch_size, lambda x, y, g: (aug.weak(x, g), y))
        if "pretrain" in need else None,
    )
