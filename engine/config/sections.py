"""One typed dataclass per config section; each validates its own values in __post_init__.

Errors raise ConfigError(key, message) with the key relative to the section; the loader adds the
section's path ('semi.threshold', 'stages.semi.optim.blr') so the user sees exactly what to fix.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from engine.errors import ConfigError

# run.compile: what torch.compile compiles; the booleans of earlier versions are aliases
COMPILE_MODES = ("off", "model", "step")
COMPILE_ALIASES = {"true": "model", "false": "off"}

# data.loader choices: auto picks per device (dataloading/build.py, resolve_loader)
LOADERS = ("auto", "torch", "dali")


def one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        near = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError(key, f"'{value}' is not one of {', '.join(repr(c) for c in choices)}{hint}")


def check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


@dataclass
class RunConfig:
    # run in this order; the names are checked against the table of stages (engine/stages/specs.py) on loading
    stages: list[str] = field(default_factory=lambda: ["finetune", "semi"])
    seed: int = 0  # model init, augmentation and shuffling; the label split has its own seed
    device: str = "auto"  # auto (cuda when present) | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    # off | model (torch.compile the model) | step (the whole micro-step: teacher, pseudo labels, mixup, student,
    # losses and their backward as one graph; docs/performance.md); true / false are model / off
    compile: str | bool = "off"
    cuda_graphs: bool = False  # replay the compiled step as a CUDA graph: needs CUDA and compile = "step"
    threads: int = 0  # CPU intra-op threads; 0 keeps torch's default
    # auto (keep on a CPU run) | keep (freed tensor memory stays in the process: no page faults on reuse,
    # engine/host_memory.py) | system (malloc's defaults)
    host_memory: str = "auto"
    # fused ops (EMA, pseudo labels, pseudo mixup, soft-target CE): auto (Triton on CUDA, native C++ on
    # CPU when built, torch otherwise) | triton | native | torch | reference; `python -m kernels` shows it
    kernels: str = "auto"
    name: str = ""  # run-folder prefix; empty = the config file's stem

    def __post_init__(self):
        check(len(self.stages) > 0, "stages", "needs at least one stage, e.g. [\"finetune\", \"semi\"]")
        check(len(set(self.stages)) == len(self.stages), "stages", f"lists a stage twice: {self.stages}")
        one_of("device", self.device, ("auto", "cpu", "cuda"))
        one_of("precision", self.precision, ("auto", "bf16", "fp32"))
        check(self.threads >= 0, "threads", f"must be >= 0, got {self.threads}")
        one_of("host_memory", self.host_memory, ("auto", "keep", "system"))
        one_of("kernels", self.kernels, ("auto", "triton", "native", "torch", "reference"))
        self.compile = COMPILE_ALIASES.get(str(self.compile).lower(), self.compile)
        one_of("compile", self.compile, COMPILE_MODES)
        check(not (self.compile == "step" and self.kernels == "reference"), "compile",
              "'step' cannot trace run.kernels = reference (the spec branches on data): use run.kernels = auto, "
              "or run.compile = model")
        check(not self.cuda_graphs or self.compile == "step", "cuda_graphs",
              f"replays the compiled step, but run.compile = '{self.compile}': set --run.compile step as well")


@dataclass
class DistConfig:
    # Number of processes the recipe was written for: used by --dry-run to print the published global
    # batch and lr. A real launch uses torchrun's WORLD_SIZE and scales the lr to the actual batch.
    world_size: int = 1
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    # ddp: every rank holds the whole model, optimizer and teacher | fsdp: FSDP2, all three sharded per
    # block across ranks; checkpoints are torch.distributed.checkpoint folders (resumable on any world size)
    strategy: str = "ddp"
    # seconds any collective may wait for the other ranks before the run stops with an error naming it (a
    # hung or dead rank); long enough for a slow rank-0 checkpoint write or a first compile while others wait
    timeout_s: float = 600.0

    def __post_init__(self):
        check(self.world_size >= 1, "world_size", f"must be >= 1, got {self.world_size}")
        check(self.timeout_s > 0, "timeout_s", f"must be > 0 seconds, got {self.timeout_s}")
        one_of("backend", self.backend, ("auto", "nccl", "gloo"))
        one_of("strategy", self.strategy, ("ddp", "fsdp"))


@dataclass
class ModelConfig:
    arch: str = "vit_base_patch16"  # see engine.models.ARCHS
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "avg"  # avg (MAE/Semi-ViT default) | token (class token; ViT-H)
    pos_embed: str = "learned"  # learned | sincos (fixed)
    drop_path: float = 0.0
    attn_backend: str = "sdpa"  # sdpa | math | xformers
    grad_checkpointing: bool = False  # activation checkpointing per block: less memory, ~30% more compute
    init: str = ""  # weights to start from: an MAE/timm checkpoint or one of this engine's checkpoints

    def __post_init__(self):
        check(self.img_size > 0, "img_size", f"must be > 0, got {self.img_size}")
        check(self.in_chans > 0, "in_chans", f"must be > 0, got {self.in_chans}")
        check(self.num_classes > 1, "num_classes", f"must be > 1, got {self.num_classes}")
        one_of("global_pool", self.global_pool, ("avg", "token"))
        one_of("pos_embed", self.pos_embed, ("learned", "sincos"))
        check(0.0 <= self.drop_path < 1.0, "drop_path", f"must be in [0, 1), got {self.drop_path}")
        one_of("attn_backend", self.attn_backend, ("sdpa", "math", "xformers"))


@dataclass
class DataConfig:
    source: str = "imagefolder"  # imagefolder (ImageNet layout: root/train/<class>/*.JPEG) | digits (embedded)
    root: str = ""
    train_dir: str = "train"
    val_dir: str = "val"
    labelled_index: str = ""  # CSV with column Index (positions into the sorted train samples); "" = generate
    unlabelled_index: str = ""  # CSV like above; "" = every train sample not labelled
    label_fraction: float = 0.01  # generated split: fraction of each class that is labelled
    labels_per_class: int = 0  # generated split: exact count per class (overrides label_fraction when > 0)
    split_seed: int = 0  # generated split: independent of rank and run.seed
    test_fraction: float = 0.3  # digits only: held-out test split (fixed)
    batch_size: int = 64  # labelled images per process and step
    eval_batch_size: int = 128
    num_workers: int = 8  # CPU decoding workers per process (DALI: its CPU threads)
    # torch (PIL decode + torchvision/timm-style transforms in DataLoader workers) | dali (NVIDIA DALI;
    # decoding on the GPU on CUDA) | auto (DALI on CUDA when installed, torch otherwise)
    loader: str = "auto"
    exclude: str = ""  # exclusion list (python -m dataloading.validate ROOT --out FILE): files both loaders skip
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])

    def __post_init__(self):
        one_of("source", self.source, ("imagefolder", "digits"))
        check(0.0 < self.label_fraction <= 1.0, "label_fraction", f"must be in (0, 1], got {self.label_fraction}")
        check(self.labels_per_class >= 0, "labels_per_class", f"must be >= 0, got {self.labels_per_class}")
        check(0.0 < self.test_fraction < 1.0, "test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        check(self.eval_batch_size > 0, "eval_batch_size", f"must be > 0, got {self.eval_batch_size}")
        check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        one_of("loader", self.loader, LOADERS)
        check(len(self.mean) == len(self.std) and len(self.mean) > 0, "mean",
              f"mean and std need the same length (one per channel), got {len(self.mean)} and {len(self.std)}")
        check(all(s > 0 for s in self.std), "std", f"every entry must be > 0, got {self.std}")


@dataclass
class AugmentConfig:
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    hflip: float = 0.5  # horizontal-flip probability (0 for digits: a flipped digit is another symbol)
    color_jitter: float = 0.4  # weak view's brightness/contrast/saturation strength
    randaug: str = "rand-m9-mstd0.5-inc1"  # strong view / fine-tune policy; "" disables RandAugment
    reprob: float = 0.25  # random-erasing probability
    mixup: float = 0.8  # labelled mixup Beta alpha; 0 disables
    cutmix: float = 1.0  # labelled cutmix Beta alpha; 0 disables
    switch_prob: float = 0.5  # chance of cutmix when both are on
    smoothing: float = 0.1  # label smoothing of the labelled loss

    def __post_init__(self):
        check(len(self.crop_scale) == 2 and 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0, "crop_scale",
              f"must be [min, max] with 0 < min <= max <= 1, got {self.crop_scale}")
        for key in ("hflip", "reprob", "switch_prob"):
            v = getattr(self, key)
            check(0.0 <= v <= 1.0, key, f"is a probability, must be in [0, 1], got {v}")
        check(self.color_jitter >= 0.0, "color_jitter", f"must be >= 0, got {self.color_jitter}")
        check(self.mixup >= 0.0 and self.cutmix >= 0.0, "mixup", "mixup and cutmix alphas must be >= 0")
        check(0.0 <= self.smoothing < 1.0, "smoothing", f"must be in [0, 1), got {self.smoothing}")
        if self.randaug:
            check(self.randaug.startswith("rand"), "randaug",
                  f"expected a RandAugment policy like 'rand-m9-mstd0.5-inc1' or \"\", got '{self.randaug}'")


@dataclass
class OptimConfig:
    blr: float = 1e-3  # base lr; lr = blr * global labelled batch / 256
    lr: float = 0.0  # absolute lr; > 0 overrides blr
    weight_decay: float = 0.05
    layer_decay: float = 0.75  # lr scale per layer from the head down; 1 disables
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: float = 0.0  # max global grad norm; 0 disables
    accum_steps: int = 1  # gradient accumulation: micro-batches per optimizer step

    def __post_init__(self):
        check(self.blr > 0.0, "blr", f"must be > 0, got {self.blr}")
        check(self.lr >= 0.0, "lr", f"must be >= 0 (0 = derive from blr), got {self.lr}")
        check(self.weight_decay >= 0.0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(0.0 < self.layer_decay <= 1.0, "layer_decay", f"must be in (0, 1], got {self.layer_decay}")
        check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "betas",
              f"must be two numbers in [0, 1), got {self.betas}")
        check(self.eps > 0.0, "eps", f"must be > 0, got {self.eps}")
        check(self.clip_grad >= 0.0, "clip_grad", f"must be >= 0, got {self.clip_grad}")
        check(self.accum_steps >= 1, "accum_steps", f"must be >= 1, got {self.accum_steps}")


@dataclass
class ScheduleConfig:
    epochs: float = 100.0  # semi: one epoch = one pass over the unlabelled set
    warmup_epochs: float = 5.0
    min_lr: float = 1e-6
    max_steps: int = 0  # stop after this many optimizer steps (smoke tests); 0 = run all epochs

    def __post_init__(self):
        check(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        check(0 <= self.warmup_epochs <= self.epochs, "warmup_epochs",
              f"must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        check(self.min_lr >= 0.0, "min_lr", f"must be >= 0, got {self.min_lr}")
        check(self.max_steps >= 0, "max_steps", f"must be >= 0, got {self.max_steps}")


@dataclass
class SemiConfig:
    mu: int = 5  # unlabelled batch = mu * labelled batch
    lambda_u: float = 5.0  # weight of the unlabelled loss
    threshold: float = 0.6  # tau: pseudo labels with confidence >= tau count
    pseudo_mixup: bool = True  # probabilistic pseudo mixup on the strong views
    cutmix_prob: float = 0.5  # per-sample chance of cutmix (else mixup) inside pseudo mixup
    smoothing: float = 0.1  # label smoothing of the mixed pseudo targets (hard labels use plain CE)

    def __post_init__(self):
        check(self.mu >= 1, "mu", f"must be >= 1, got {self.mu}")
        check(self.lambda_u >= 0.0, "lambda_u", f"must be >= 0, got {self.lambda_u}")
        check(0.0 < self.threshold <= 1.0, "threshold", f"tau must be in (0, 1], got {self.threshold}")
        check(0.0 <= self.cutmix_prob <= 1.0, "cutmix_prob", f"must be in [0, 1], got {self.cutmix_prob}")
        check(0.0 <= self.smoothing < 1.0, "smoothing", f"must be in [0, 1), got {self.smoothing}")


@dataclass
class EmaConfig:
    enabled: bool = True  # keep an EMA of the model (in semi it is the teacher and always on)
    decay: float = 0.9999

    def __post_init__(self):
        check(0.0 <= self.decay < 1.0, "decay", f"must be in [0, 1), got {self.decay}")


@dataclass
class CheckpointConfig:
    every_epochs: int = 1  # save a resumable checkpoint every N epochs (and at the end)
    keep: int = 2  # newest checkpoints kept (at least 2, so a crash mid-save never leaves none)
    resume: str = ""  # "" = fresh start | auto = newest valid checkpoint in the run folder | a path
    export_safetensors: bool = True  # write the final teacher (or model) as model.safetensors
    overwrite: bool = False  # true: a start into a --out holding a run removes that run's files first

    def __post_init__(self):
        check(self.every_epochs >= 1, "every_epochs", f"must be >= 1, got {self.every_epochs}")
        check(self.keep >= 2, "keep", f"must be >= 2 (a crash mid-save must leave a valid one), got {self.keep}")


@dataclass
class EvalConfig:
    every_epochs: int = 1  # evaluate student and teacher every N epochs (and at the end)
    checkpoint: str = ""  # stages "eval" / "pseudo_label": the checkpoint to use ("" = the previous stage's)

    def __post_init__(self):
        check(self.every_epochs >= 1, "every_epochs", f"must be >= 1, got {self.every_epochs}")


@dataclass
class LoggingConfig:
    every_steps: int = 50  # the only steps that sync with the host (.item()) to log metrics
    tensorboard: bool = True
    progress: bool = True  # tqdm bars on rank 0
    nonfinite: str = "skip"  # non-finite loss: skip (the optimizer step, bounded) | stop (save, exit)
    max_skips: int = 20  # "skip": stop after this many skipped steps

    def __post_init__(self):
        check(self.every_steps >= 1, "every_steps", f"must be >= 1, got {self.every_steps}")
        one_of("nonfinite", self.nonfinite, ("skip", "stop"))
        check(self.max_skips >= 0, "max_skips", f"must be >= 0, got {self.max_skips}")


@dataclass
class ProfileConfig:
    """torch.profiler over a few steps (--profile.steps N) and NVTX ranges for Nsight Systems."""

    steps: int = 0  # profile this many training steps of each stage (0 = off); rank 0 only
    wait: int = 5  # steps to skip first (start-up, allocator warm-up)
    warmup: int = 2  # steps the profiler runs but discards (its own start-up cost)
    nvtx: bool = False  # NVTX ranges named after the method's steps, for `nsys profile`

    def __post_init__(self):
        for key in ("steps", "wait", "warmup"):
            v = getattr(self, key)
            check(v >= 0, key, f"must be >= 0, got {v}")


@dataclass
class MaeConfig:
    """MAE pre-training (stage "pretrain"): masking and the light decoder."""

    mask_ratio: float = 0.75  # fraction of patches hidden from the encoder
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True  # regress per-patch normalised pixels

    def __post_init__(self):
        check(0.0 < self.mask_ratio < 1.0, "mask_ratio", f"must be in (0, 1), got {self.mask_ratio}")
        check(self.decoder_dim > 0 and self.decoder_depth > 0, "decoder_dim", "decoder width and depth must be > 0")
        check(self.decoder_dim % 4 == 0, "decoder_dim",
              f"must be divisible by 4 (2-D sin-cos positions), got {self.decoder_dim}")
        check(self.decoder_heads > 0 and self.decoder_dim % self.decoder_heads == 0, "decoder_heads",
              f"must divide decoder_dim={self.decoder_dim}, got {self.decoder_heads}")
