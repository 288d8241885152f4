"""NVIDIA DALI pipelines for image folders (data.loader = "dali"): the same views as transforms.py.

Pipelines: labelled (crop, flip, RandAugment, normalise, pixel erasing); unlabelled pair (one decode, then
a weak view: its own crop, flip, colour jitter; and a strong view: its own crop, flip, RandAugment,
pixel erasing); evaluation (resize the short side to img_size / 0.875, bicubic, centre crop); MAE
pre-training (crop with pretrain's scale, flip). On a CUDA device JPEGs decode with device="mixed" and
the batches stay on the GPU; without one the same definitions run CPU-only (device_id=None).

DALI is fed from the engine's own ShardedSampler (fn.external_source, the encoded files of each batch, read
ahead of the consumer by DALI's asynchronous executor), so sharding by rank, the per-epoch shuffle, epoch
lengths, the exclusion list and mid-epoch resume are decided in one place for both loaders. DALI draws its
random numbers per pipeline, which each stream builds once, seeded from (run seed, stream, rank, first epoch,
first batch): a run is reproducible, but after a mid-run resume the augmentations differ from those the
uninterrupted run would have drawn (the samples and their order are the same; the torch loader is bit-exact
there too).

A pipeline cannot skip a file it cannot decode: an unreadable image stops the run with a message naming
the file and the validate command that writes the exclusion list (data.exclude).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from dataloading.randaug import LEVEL_DENOM, RandAugSpec
from dataloading.readable import check_image
from dataloading.sampler import ShardedSampler, derive_seed
from dataloading.streams import StageData
from engine.errors import UserError

INSTALL = "pip install nvidia-dali-cuda130 (the project's 'dali' extra: pip install -e '.[dali]')"
EVAL_CROP_PCT = 0.875
ERASE_AREA = (0.02, 1 / 3)
ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))


def available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def require() -> None:
    if not available():
        raise UserError(f"data.loader = 'dali' needs NVIDIA DALI, which is not installed: {INSTALL}; or set "
                        f"data.loader = 'torch' (or 'auto')")


def resolve_loader(data, device: torch.device | str) -> str:
    """The loader that runs: 'torch' or 'dali'. `auto` takes DALI on a CUDA device when it is installed and
    the data is a folder (GPU decoding); on a CPU the torch loader, which is as fast as DALI's CPU
    pipelines there (bench/RESULTS.md), skips unreadable files and follows timm's recipe exactly."""
    if data.source != "imagefolder":
        return "torch"  # the in-memory digits have nothing to decode
    if data.loader == "dali":
        require()
        return "dali"
    if data.loader == "auto" and torch.device(device).type == "cuda":
        return "dali" if available() else "torch"
    return "torch"


# ------------------------------------------------------------------------------------------ the views
def _crop(images, img_size: int, scale):
    from nvidia.dali import fn, types

    return fn.random_resized_crop(images, size=[img_size, img_size], random_area=[float(v) for v in scale],
                                  random_aspect_ratio=[3 / 4, 4 / 3], interp_type=types.INTERP_CUBIC,
                                  antialias=True)


def _normalise(images, mean, std, hflip: float, crop=None):
    """HWC uint8 -> CHW float32, (x / 255 - mean) / std, mirrored with probability hflip."""
    from nvidia.dali import fn, types

    mirror = fn.random.coin_flip(probability=hflip) if hflip > 0 else 0
    kw = dict(crop=crop, crop_pos_x=0.5, crop_pos_y=0.5) if crop else {}
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mirror=mirror,
                                    mean=[255.0 * m for m in mean], std=[255.0 * s for s in std], **kw)


def _jitter(images, strength: float):
    """torchvision's ColorJitter(b, c, s) factors, uniform in [1 - s, 1 + s], applied in a fixed order."""
    from nvidia.dali import fn

    if strength <= 0:
        return images
    rng = [max(0.0, 1.0 - strength), 1.0 + strength]
    return fn.color_twist(images, brightness=fn.random.uniform(range=rng), contrast=fn.random.uniform(range=rng),
                          saturation=fn.random.uniform(range=rng))


def randaug_ops(spec: RandAugSpec):
    """timm's op set (inc1: the 'increasing' set) as DALI auto_aug augmentations, magnitudes on timm's
    0..10 scale (bin m of 11)."""
    from nvidia.dali.auto_aug import augmentations as A

    equalize, sharpness = _with_op(A.equalize, _equalize), _with_op(A.sharpness, _sharpen)
    posterize = A.posterize.augmentation(mag_range=(0, 4), mag_to_param=_posterize_mask(spec.increasing))
    solarize = A.solarize.augmentation(mag_range=(256, 0)) if spec.increasing else \
        A.solarize.augmentation(mag_range=(0, 256), mag_to_param=_floor)  # timm: int(level / 10 * 256)
    enhance = [A.color, A.contrast, A.brightness, sharpness]
    if not spec.increasing:  # timm's plain set: factor (level / 10) * 1.8 + 0.1, unsigned
        enhance = [a.augmentation(mag_range=(0.1, 1.9), randomly_negate=False,
                                  mag_to_param=A.sharpness_kernel_shifted if a is sharpness else _factor)
                   for a in enhance]
    translate = [a.augmentation(mag_range=(0, 0.45)) for a in (A.translate_x, A.translate_y)]  # timm's 0.45
    return [A.auto_contrast, equalize, A.invert, A.rotate, posterize, solarize,
            A.solarize_add, *enhance, A.shear_x, A.shear_y, *translate]


# DALI's own equalize and sharpness augmentations call the deprecated fn.experimental aliases; these call the
# same operators by their current names (the experimental ones on DALI releases that lack them).
def _with_op(aug, op):
    """`aug` with `op` as its body; magnitudes, sign, parameter mapping, device and name kept."""
    from nvidia.dali.auto_aug.core import augmentation

    return augmentation(op, mag_range=aug.mag_range, randomly_negate=aug.randomly_negate,
                        mag_to_param=aug.mag_to_param, param_device=aug.param_device, name=aug.name)


def _operator(name: str):
    from nvidia.dali import fn

    return getattr(fn, name, None) or getattr(fn.experimental, name)


def _equalize(data, _):
    return _operator("equalize")(data)


def _sharpen(data, kernel):
    return _operator("filter")(data, kernel)


def _floor(mag):
    return np.float32(int(mag))


def _factor(mag):
    return np.float32(mag)  # the enhance factor itself (DALI's default maps a signed strength to 1 + it)


def _posterize_mask(increasing: bool):
    def mask(mag):  # bits kept: 4 - int(mag) (increasing, 1 bit at m9) or int(mag); as an 8-bit AND mask
        bits = 4 - int(mag) if increasing else int(mag)
        return np.uint8((0xFF << (8 - bits)) & 0xFF)
    return mask


def op_kwargs(images, fill) -> dict:
    """What the geometric ops need: the image shape (relative translation), the fill, the resampling."""
    from nvidia.dali import fn, types

    shape = fn.cast(images.shape(), dtype=types.FLOAT) if hasattr(images, "shape") else fn.shapes(images)
    # DALI's warps take one fill value and have no cubic mode: the mean of timm's fill, linear resampling
    return dict(shape=shape, fill_value=float(np.mean(fill)), interp_type=types.INTERP_LINEAR)


def _randaug(images, spec: RandAugSpec | None, fill: list[int]):
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug import rand_augment

    if spec is None or spec.num_ops == 0:
        return images
    ops = randaug_ops(spec)
    m = int(round(min(max(spec.magnitude, 0.0), min(spec.mmax, LEVEL_DENOM))))
    for _ in range(spec.num_ops):
        if fn.random.coin_flip(probability=spec.prob, dtype=types.BOOL):  # each drawn op applied with p
            images = rand_augment.apply_rand_augment(ops, images, n=1, m=m, num_magnitude_bins=int(LEVEL_DENOM) + 1,
                                                     **op_kwargs(images, fill))
    return images


def _erase(images, reprob: float):
    """timm's pixel-mode random erasing on a normalised CHW batch: one box (2 %..1/3 of the area, aspect
    0.3..3.3) of N(0, 1) noise with probability reprob; the box is clipped to the image instead of redrawn."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    if reprob <= 0:
        return images
    if fn.random.coin_flip(probability=reprob, dtype=types.BOOL):  # the work only for the erased samples
        area = fn.random.uniform(range=list(ERASE_AREA))
        ratio = dmath.exp(fn.random.uniform(range=list(ERASE_LOG_RATIO)))
        h = dmath.min(dmath.sqrt(area * ratio), 0.999)
        w = dmath.min(dmath.sqrt(area / ratio), 0.999)
        y0 = fn.random.uniform(range=[0.0, 1.0]) * (1.0 - h)
        x0 = fn.random.uniform(range=[0.0, 1.0]) * (1.0 - w)
        keep = fn.erase(images * 0.0 + 1.0, anchor=fn.stack(y0, x0), shape=fn.stack(h, w), axis_names="HW",
                        normalized_anchor=True, normalized_shape=True, fill_value=0.0)
        images = images * keep + fn.random.normal(images) * (1.0 - keep)
    return images


def _views(kind: str, images, p: dict):
    """The pipeline outputs for `kind` from decoded HWC uint8 images."""
    mean, std, size, aug = p["mean"], p["std"], p["img_size"], p["augment"]
    if kind == "evaluation":
        crop_pct = EVAL_CROP_PCT if size <= 224 else 1.0
        from nvidia.dali import fn, types

        resized = fn.resize(images, resize_shorter=int(size / crop_pct), interp_type=types.INTERP_CUBIC,
                            antialias=True)
        return (_normalise(resized, mean, std, 0.0, crop=(size, size)),)
    if kind == "pretrain":
        return (_normalise(_crop(images, size, aug.crop_scale), mean, std, aug.hflip),)
    if kind == "labelled":
        x = _randaug(_crop(images, size, aug.crop_scale), p["policy"], p["fill"])
        return (_erase(_normalise(x, mean, std, aug.hflip), aug.reprob),)
    # unlabelled: one decode, two independent crops
    weak = _normalise(_jitter(_crop(images, size, aug.crop_scale), aug.color_jitter), mean, std, aug.hflip)
    jitter = aug.color_jitter if p["policy"] is None or p["policy"].num_ops == 0 else 0.0  # timm's rule
    strong = _randaug(_jitter(_crop(images, size, aug.crop_scale), jitter), p["policy"], p["fill"])
    return weak, _erase(_normalise(strong, mean, std, aug.hflip), aug.reprob)


def build_pipeline(kind: str, params: dict, source: Callable, *, batch_size: int, num_threads: int,
                   device_id: int | None, seed: int):
    """A built DALI pipeline whose input is `source()`: the encoded files of the next batch. DALI calls it
    ahead of the consumer (prefetch depth 2, asynchronous executor), so decoding overlaps the training step."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(enable_conditionals=True)
    def pipe():
        jpegs = fn.external_source(source=source, batch=True, dtype=types.UINT8, ndim=1)
        images = fn.decoders.image(jpegs, device="cpu" if device_id is None else "mixed", output_type=types.RGB)
        return _views(kind, images, params)

    p = pipe(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed, prefetch_queue_depth=2)
    p.build()
    return p


class _Feed:
    """external_source's callback: the files of the current epoch's next batch; StopIteration ends the
    epoch for DALI. Remembers what it handed out, so each output batch gets its positions back."""

    def __init__(self, folder):
        self.folder, self.batches, self.pending = folder, iter(()), deque()

    def start(self, batches) -> None:
        self.batches, self.pending = iter(batches), deque()

    def __call__(self) -> list[np.ndarray]:
        pos = next(self.batches)
        self.pending.append(pos)
        return [np.fromfile(self.folder.path(int(p)), dtype=np.uint8) for p in pos]


def to_torch(tensor_list, device: torch.device) -> Tensor:
    """A DALI output batch as a new torch tensor on `device` (DALI reuses its buffers)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    t = tensor_list.as_tensor()
    out = torch.empty(t.shape(), dtype=torch.float32, device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(t, out, cuda_stream=stream)
    return out


# ------------------------------------------------------------------------------------------ streams
class DaliStream:
    """A BatchStream: the sampler's batches of positions -> encoded files -> a DALI pipeline."""

    def __init__(self, folder, positions: np.ndarray, sampler: ShardedSampler, make_pipe: Callable,
                 device: torch.device):
        self.folder, self.positions = folder, np.asarray(positions, dtype=np.int64)
        self.sampler, self.make_pipe, self.device = sampler, make_pipe, device
        self.num_samples = sampler.num_samples
        self.sample_ids = self.positions
        self.corrupt_count, self.corrupt_files = 0, []  # DALI stops at an unreadable file instead
        self._feed, self._pipe, self._clean = _Feed(folder), None, False

    def __len__(self) -> int:
        return len(self.sampler)

    def _fix(self) -> str:
        root = self.folder.root.parent
        return (f"list every unreadable image with python -m dataloading.validate {root} --out {root}/exclude.txt "
                f"and set data.exclude = \"{root}/exclude.txt\" (or use data.loader = 'torch', which skips them)")

    def _unreadable(self, paths: list[str], err: Exception) -> UserError:
        for path in paths:
            problem = check_image(path)
            if problem is not None:
                return UserError(f"unreadable image {path} ({problem}); DALI cannot skip it: {self._fix()}")
        return UserError(f"DALI failed on a batch of {len(paths)} images from {paths[0]} on ({err}); {self._fix()}")

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, ...]]:
        s = self.sampler
        if not 0 <= start <= len(s):
            raise ValueError(f"start={start} is outside 0..{len(s)} (batches per epoch)")
        if start == len(s):
            return
        self._feed.start([self.positions[idx] for idx in s.batches(epoch, start)])
        if self._pipe is None or not self._clean:  # built once; again only after an abandoned epoch, whose
            # prefetched batches would come out first
            self._pipe = self.make_pipe(self._feed, derive_seed(s.seed, s.stream, s.rank, epoch, start) % (2**31 - 1))
        else:
            self._pipe.reset()  # after the previous epoch's StopIteration
        self._clean = False
        while True:
            try:
                outs = self._pipe.run()
            except StopIteration:
                self._clean = True
                return
            except RuntimeError as e:
                self._pipe = None
                pending = [self.folder.path(int(p)) for pos in self._feed.pending for p in pos]
                raise self._unreadable(pending, e) from None
            pos = self._feed.pending.popleft()
            labels = torch.as_tensor(self.folder.targets[pos]).to(self.device)
            yield (*(to_torch(o, self.device) for o in outs), labels)


def build_streams(data, augment, policy: RandAugSpec | None, *, train, val, sets: dict, eval_positions: np.ndarray,
                  sampler: Callable, img_size: int, seed: int, rank: int, device: torch.device,
                  need: set[str]) -> StageData:
    """StageData of DaliStreams; `sets` maps stream name -> (positions, batch size) like the torch loader."""
    require()
    if len(data.mean) != 3:
        raise UserError("data.loader = 'dali' reads images as RGB: give data.mean and data.std 3 entries (and "
                        "model.in_chans = 3), or use data.loader = 'torch' for greyscale")
    device = torch.device(device)
    device_id = None
    if device.type == "cuda":
        device_id = device.index if device.index is not None else torch.cuda.current_device()
    fill = [min(255, int(round(255 * m))) for m in data.mean]
    params = dict(mean=list(data.mean), std=list(data.std), img_size=img_size, augment=augment, policy=policy,
                  fill=fill)

    def stream(kind: str, folder, positions: np.ndarray, bs: int, train_stream: bool = True) -> DaliStream:
        smp = sampler(kind, positions, bs, train_stream)
        threads = max(1, data.num_workers)
        make = lambda source, s: build_pipeline(kind, params, source, batch_size=bs,  # noqa: E731
                                                num_threads=threads, device_id=device_id, seed=s)
        return DaliStream(folder, positions, smp, make, device)

    out = StageData(num_classes=len(train.classes), in_chans=3, classes=train.classes,
                    labelled=None, unlabelled=None, evaluation=None, pretrain=None)
    for name in ("labelled", "unlabelled", "pretrain"):
        if name in need:
            setattr(out, name, stream(name, train, *sets[name]))
    out.evaluation = stream("evaluation", val, eval_positions, data.eval_batch_size, False)
    return out
