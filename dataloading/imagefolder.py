"""ImageNet-layout folders (root/train/<class>/*.JPEG, root/val/<class>/*.JPEG) decoded on CPU workers.

Sample order = torchvision's ImageFolder order: class folders sorted by name, then files as
torchvision's make_dataset walks them (sorted), which is what the community 1 % / 10 % index CSVs index
into. Each stream is a DataLoader (num_workers, persistent workers, pin_memory on CUDA) over a
ShardedSampler; every sample's augmentation is seeded from (seed, stream, epoch, position), so
`epoch(e, start=k)` reproduces the tail of `epoch(e)` exactly here too, whatever worker reads it.

Unreadable images: the dataset catches the decode error, warns once per file, marks the file in a
shared-memory flag array (visible from every worker and the main process) and substitutes the next
readable sample, so batch shapes stay fixed. `stream.corrupt_count` / `stream.corrupt_files` read the
flags: the distinct unreadable files this stream has met so far. `python -m dataloading.validate ROOT
--out FILE` lists them all up front; with data.exclude = FILE both loaders leave them out.

data.loader = "dali" (or "auto" on a GPU) builds DALI streams instead (dali.py) over the same positions
and the same samplers.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, get_worker_info

from dataloading import dali
from dataloading import transforms as T
from dataloading.exclude import excluded_positions, keep, read_exclusions
from dataloading.randaug import parse_randaug
from dataloading.sampler import EpochBatchSampler, ShardedSampler
from dataloading.splits import choose_split
from dataloading.streams import STREAM_IDS, StageData, check_batches
from engine.errors import UserError

MAX_SUBSTITUTES = 64  # consecutive unreadable samples before giving up


@dataclass
class Folder:
    """The images of one split folder, in ImageFolder order. Paths are stored as one numpy bytes array
    (not a list of str) so forked workers do not copy them page by page through refcount updates."""
    root: Path
    classes: list[str]
    paths: np.ndarray  # relative paths, UTF-8 bytes
    targets: np.ndarray  # int64 class index per sample

    def __len__(self) -> int:
        return len(self.targets)

    def path(self, i: int) -> str:
        return str(self.root / self.paths[i].decode())


LAYOUT = "expected ROOT/<train_dir>/<class>/<image> and ROOT/<val_dir>/<class>/<image> (ImageNet layout)"


def scan(path: Path, what: str) -> Folder:
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    if not path.is_dir():
        raise UserError(f"{what} folder {path} does not exist: {LAYOUT}; set data.root (and data.train_dir / "
                        f"data.val_dir)")
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir())
    if not classes:
        raise UserError(f"{what} folder {path} has no class sub-folders: {LAYOUT}")
    samples = make_dataset(str(path), {c: i for i, c in enumerate(classes)}, extensions=IMG_EXTENSIONS,
                           allow_empty=True)
    targets = np.fromiter((t for _, t in samples), dtype=np.int64, count=len(samples))
    empty = [c for c, n in zip(classes, np.bincount(targets, minlength=len(classes))) if n == 0]
    if empty:
        raise UserError(f"{what} folder {path}: {len(empty)} class folder(s) hold no images "
                        f"({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}); "
                        f"image files end in {', '.join(IMG_EXTENSIONS)}")
    prefix = len(str(path)) + 1
    paths = np.array([p[prefix:].encode() for p, _ in samples], dtype=np.bytes_)
    return Folder(root=path, classes=classes, paths=paths, targets=targets)


def scan_both(data) -> tuple[Folder, Folder]:
    if not data.root:
        raise UserError(f"data.root is empty: set it to the data set folder ({LAYOUT}), or use "
                        f"data.source = 'digits' for the embedded demo")
    root = Path(data.root).expanduser()
    if not root.is_dir():
        raise UserError(f"data.root = '{data.root}' does not exist: {LAYOUT}")
    train = scan(root / data.train_dir, "train")
    val = scan(root / data.val_dir, "val")
    if val.classes != train.classes:
        missing = sorted(set(train.classes) - set(val.classes))
        extra = sorted(set(val.classes) - set(train.classes))
        show = lambda xs: ", ".join(xs[:5]) + (f", ... ({len(xs)} in all)" if len(xs) > 5 else "")  # noqa: E731
        raise UserError(f"val folder {val.root} must have the same class folders as {train.root}: "
                        + "; ".join(s for s in (f"missing in val: {show(missing)}" if missing else "",
                                                f"not in train: {show(extra)}" if extra else "") if s)
                        + " (ImageNet's val images must first be sorted into one folder per class)")
    return train, val


def describe(data) -> dict:
    train, val = scan_both(data)
    split = choose_split(train.targets, len(train.classes), data, class_names=train.classes, root=data.root)
    return {"num_classes": len(train.classes), "labelled": len(split.labelled), "unlabelled": len(split.unlabelled),
            "evaluation": len(val), "pretrain": len(split.pretrain)}


class FolderDataset(Dataset):
    """Samples `positions` of `folder`; `views(img, label)` makes the sample tuple from the decoded image.

    Keys are positions into `positions` (0..len-1), or (position, seed) from EpochBatchSampler: the
    augmentation then draws from torch's RNG seeded with `seed` (forked off the caller's RNG when not in a
    worker, so the trainer's random state is untouched).
    """

    def __init__(self, folder: Folder, positions: np.ndarray, views: Callable, mode: str):
        self.folder, self.positions = folder, np.asarray(positions, dtype=np.int64)
        self.views, self.mode = views, mode  # mode: PIL mode, 'RGB' or 'L'
        self.bad = torch.zeros(len(self.positions), dtype=torch.uint8).share_memory_()  # 1 = unreadable

    def __len__(self) -> int:
        return len(self.positions)

    def _decode(self, i: int) -> tuple[Image.Image, int]:
        n = len(self.positions)
        for step in range(min(n, MAX_SUBSTITUTES)):
            j = (i + step) % n
            if self.bad[j]:
                continue
            path = self.folder.path(int(self.positions[j]))
            try:
                with Image.open(path) as im:
                    return im.convert(self.mode), int(self.folder.targets[self.positions[j]])
            except Exception as e:  # noqa: BLE001 (PIL raises OSError, SyntaxError, ValueError, ... for broken files)
                if not self.bad[j]:
                    self.bad[j] = 1
                    warnings.warn(f"unreadable image {path} ({type(e).__name__}: {e}); using the next readable "
                                  f"sample instead. List all such files: python -m dataloading.validate "
                                  f"{self.folder.root}", RuntimeWarning, stacklevel=2)
        first = self.folder.path(int(self.positions[i]))
        raise UserError(f"{MAX_SUBSTITUTES} consecutive unreadable images from {first} on: run "
                        f"python -m dataloading.validate {self.folder.root} and fix or remove them")

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        img, label = self._decode(int(i))
        if seed is None:
            return self.views(img, label)
        if get_worker_info() is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.views(img, label)
        torch.manual_seed(seed)
        return self.views(img, label)


class LoaderStream:
    """A BatchStream over a FolderDataset through a DataLoader; batches moved to `device`."""

    def __init__(self, dataset: FolderDataset, sampler: ShardedSampler, *, num_workers: int, device: torch.device):
        self.dataset, self.sampler, self.device = dataset, sampler, device
        self.num_samples = sampler.num_samples
        self.sample_ids = dataset.positions  # positions in the sorted folder (what index CSVs list)
        self.batch_sampler = EpochBatchSampler(sampler)
        self.loader = DataLoader(dataset, batch_sampler=self.batch_sampler, num_workers=num_workers,
                                 pin_memory=device.type == "cuda", persistent_workers=num_workers > 0)

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def corrupt_count(self) -> int:
        """Distinct unreadable files this stream has met so far (all workers)."""
        return int(self.dataset.bad.sum())

    @property
    def corrupt_files(self) -> list[str]:
        ds = self.dataset
        return [ds.folder.path(int(ds.positions[j])) for j in torch.nonzero(ds.bad).flatten()]

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, ...]]:
        self.batch_sampler.set_epoch(epoch, start)  # before iter(): the loader reads it when the epoch starts
        for batch in self.loader:
            yield tuple(t.to(self.device, non_blocking=True) for t in batch)


def build(data, augment, *, img_size: int, batch_size: int, unlabelled_batch_size: int, seed: int, rank: int,
          world_size: int, device: torch.device, need: set[str]) -> StageData:
    """The streams of `need`, through the torch or the DALI loader (dali.resolve_loader); both read the
    same positions in the same order from the same ShardedSampler."""
    if len(data.mean) not in (1, 3):
        raise UserError(f"data.mean/std have {len(data.mean)} entries: image folders are read as RGB (set 3 entries) "
                        f"or greyscale (1 entry)")
    policy = parse_randaug(augment.randaug)
    loader = dali.resolve_loader(data, device)
    train, val = scan_both(data)
    split = choose_split(train.targets, len(train.classes), data, class_names=train.classes, root=data.root)
    bad_train, bad_val = excluded(data, train), excluded(data, val)
    sets = {"labelled": (keep(split.labelled, bad_train), batch_size),
            "unlabelled": (keep(split.unlabelled, bad_train), unlabelled_batch_size),
            "pretrain": (keep(split.pretrain, bad_train), batch_size)}
    if "labelled" in need and len(sets["labelled"][0]) == 0:
        raise UserError("the labelled set is empty (every labelled image is in data.exclude): label more images")
    for name in ("unlabelled", "pretrain"):  # the labelled stream repeats itself when smaller than a batch
        if name in need:
            check_batches(name, len(sets[name][0]), sets[name][1], world_size)

    mean, std = list(data.mean), list(data.std)
    mode = "RGB" if len(mean) == 3 else "L"

    def sampler(name: str, positions: np.ndarray, bs: int, train: bool = True) -> ShardedSampler:
        return ShardedSampler(len(positions), bs, seed=seed, stream=STREAM_IDS[name], rank=rank,
                              world_size=world_size, shuffle=train, drop_last=train, repeat=name == "labelled")

    if loader == "dali":
        return dali.build_streams(data, augment, policy, train=train, val=val, sets=sets,
                                  eval_positions=keep(np.arange(len(val)), bad_val), sampler=sampler,
                                  img_size=img_size, seed=seed, rank=rank, device=device, need=need)

    def stream(name: str, folder: Folder, positions: np.ndarray, bs: int, views: Callable, train: bool = True):
        return LoaderStream(FolderDataset(folder, positions, views, mode), sampler(name, positions, bs, train),
                            num_workers=data.num_workers, device=device)

    out = StageData(num_classes=len(train.classes), in_chans=len(mean), classes=train.classes,
                    labelled=None, unlabelled=None, evaluation=None, pretrain=None)
    if "labelled" in need:
        t = T.finetune(img_size, augment, policy, mean, std)
        out.labelled = stream("labelled", train, *sets["labelled"], _Single(t))
    if "unlabelled" in need:
        views = _Pair(T.weak(img_size, augment, mean, std), T.strong(img_size, augment, policy, mean, std))
        out.unlabelled = stream("unlabelled", train, *sets["unlabelled"], views)
    if "pretrain" in need:
        t = T.pretrain(img_size, augment, mean, std)
        out.pretrain = stream("pretrain", train, *sets["pretrain"], _Single(t))
    out.evaluation = stream("evaluation", val, keep(np.arange(len(val)), bad_val), data.eval_batch_size,
                            _Single(T.evaluation(img_size, mean, std)), train=False)
    return out


def excluded(data, folder: Folder) -> np.ndarray:
    """Positions of `folder` listed in data.exclude (none when it is empty)."""
    if not data.exclude:
        return np.zeros(0, np.int64)
    return excluded_positions(folder, read_exclusions(data.exclude, data.root))


class _Single:
    """(view(img), label). A class, not a lambda, so spawn-started workers can pickle it."""

    def __init__(self, t):
        self.t = t

    def __call__(self, img, label):
        return self.t(img), label


class _Pair:
    """(weak(img), strong(img), label): one decode, two independent views."""

    def __init__(self, weak, strong):
        self.weak, self.strong = weak, strong

    def __call__(self, img, label):
        return self.weak(img), self.strong(img), label
