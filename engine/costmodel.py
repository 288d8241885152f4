"""The dry run's cost model: per-GPU memory, training FLOPs and projected wall time of a stage.

Memory per GPU (bytes), for the per-process micro-batch (labelled B + unlabelled mu B in semi):
  fp32 weights, gradients and two AdamW moments (4 + 4 + 8 bytes per trainable parameter), the EMA
  teacher (4 bytes per parameter), DDP's gradient buckets when there are several processes, autocast's
  bf16 weight copies, the input batches, and the tensors the student's forward saves for its backward.
Activations are counted per transformer block from what each op saves (PyTorch's autograd formulas):
  fp32 residual stream x2 (LayerNorm inputs) + LayerNorm statistics, and in the run's precision
  (bf16 under autocast) the inputs of qkv / fc1 / fc2, the qkv output (q, k, v views), the attention
  output (also proj's input) + its fp32 log-sum-exp (`math` attention: copies of the scaled q, k and v,
  the T x T softmax and a copy for proj instead) and the GELU input. Activation checkpointing keeps
  only each block's input, plus one block recomputed.
The total is a sum of the rows, an upper bound of the peak (gradients and activations are never all
alive at once). FLOPs: forward GFLOPs per image (engine.models.flops) x 3 for the student's forward and
backward (+1 recompute with checkpointing), + 1 for the teacher's forward over the unlabelled images.
Disk: the checkpoints a run keeps (fp32 tensors and their serialisation records) and its export, which the
preflight compares with the free space of the run folder's filesystem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import Config
from engine.errors import UserError
from engine.models.flops import param_count
from engine.models.vit import ARCHS
from engine.stages.specs import STAGE_SPECS, per_process_batch

GIB = 2**30
USABLE = 0.90  # share of a GPU's memory a run can plan on (CUDA context, NCCL buffers, fragmentation)
ASSUMED_MFU = 0.40  # used when bench/results/ holds no GPU-suite measurement for the chosen GPU
IMAGENET_TRAIN = 1_281_167  # assumed when the recipe's data is not on this machine
RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float  # nominal capacity
    bf16_tflops: float  # dense tensor-core peak from the vendor's data sheet
    tf32_tflops: float
    match: tuple[str, ...]  # substrings of torch.cuda.get_device_name() that identify it


DEFAULT_GPU = "h100-80gb"
GPUS = {
    "a100-40gb": Gpu("A100 40GB", 40, 312, 156, ("A100", "40GB")),
    "a100-80gb": Gpu("A100 80GB", 80, 312, 156, ("A100", "80GB")),
    "h100-80gb": Gpu("H100 SXM 80GB", 80, 989, 495, ("H100",)),
    "h200": Gpu("H200 141GB", 141, 989, 495, ("H200",)),
}


def gpu(key: str) -> Gpu:
    if key not in GPUS:
        import difflib

        near = [k for k in GPUS if k.startswith(key)] or difflib.get_close_matches(key, list(GPUS), n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise UserError(f"--dry-run-gpu: unknown GPU '{key}'; {hint}choose one of {', '.join(GPUS)}")
    return GPUS[key]


# --- activations ------------------------------------------------------------------------------------

def block_activation_bytes(tokens: int, dim: int, heads: int, hidden: int, act: int, attn_backend: str) -> int:
    """Bytes one transformer block saves for backward, per sample. `act`: bytes per matmul element
    (2 under bf16 autocast, 4 in fp32); the residual stream and LayerNorm stay fp32."""
    t, d = tokens, dim
    residual = 2 * t * d * 4 + 2 * 2 * t * 4  # LayerNorm inputs (x, x + attn) + mean/rstd of both
    matmul_inputs = (t * d + t * d + t * hidden) * act  # qkv, fc1 inputs; fc2 input = GELU output
    gelu_in = t * hidden * act  # fc1 output
    if attn_backend == "math":  # contiguous copies of scaled q, k and v for the batched matmuls, the
        attention = 3 * t * d * act + heads * t * t * act + t * d * act  # T x T softmax, proj's input copy
    else:  # fused kernels save q, k, v (views of the qkv output), their output (laid out so that
        attention = 3 * t * d * act + t * d * act + heads * t * 4  # proj's input is a view) and a log-sum-exp
    return residual + matmul_inputs + gelu_in + attention


def vit_activation_bytes(spec: dict, img_size: int, in_chans: int, num_classes: int, global_pool: str,
                         attn_backend: str, act: int, checkpointing: bool) -> int:
    """Bytes the ViT's forward saves for backward, per sample (engine.models.vit layout)."""
    patches = (img_size // spec["patch_size"]) ** 2
    t, d, depth = patches + 1, spec["embed_dim"], spec["depth"]
    hidden = int(d * spec["mlp_ratio"])
    block = block_activation_bytes(t, d, spec["num_heads"], hidden, act, attn_backend)
    blocks = depth * t * d * 4 + block if checkpointing else depth * block  # inputs kept, one block rebuilt
    image = in_chans * img_size * img_size * act  # the patch-embedding convolution's input
    pooled = t * d * 4 + 2 * t * 4 if global_pool == "token" else d * 4 + 2 * 4  # final LayerNorm's input
    head = d * act + 2 * num_classes * 4  # head input; logits and their softmax for the loss
    return blocks + image + pooled + head


def mae_activation_bytes(spec: dict, img_size: int, in_chans: int, mask_ratio: float, decoder_dim: int,
                         decoder_depth: int, decoder_heads: int, attn_backend: str, act: int) -> int:
    """MAE: the encoder on the visible patches, the decoder on all of them (per sample)."""
    patches = (img_size // spec["patch_size"]) ** 2
    visible = int(patches * (1 - mask_ratio)) + 1
    d = spec["embed_dim"]
    enc = spec["depth"] * block_activation_bytes(visible, d, spec["num_heads"], int(d * spec["mlp_ratio"]), act,
                                                  attn_backend)
    dec = decoder_depth * block_activation_bytes(patches + 1, decoder_dim, decoder_heads, 4 * decoder_dim, act,
                                                 attn_backend)
    return enc + dec + in_chans * img_size * img_size * (act + 2 * 4)  # input, target and prediction


def measure_saved_bytes(fn, weights) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn()` runs, without those of
    `weights` (counted as parameters): the measurement the activation estimate is checked against."""
    skip = {w.untyped_storage().data_ptr() for w in weights}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


# --- a stage's costs -------------------------------------------------------------------------------

def micro_batch(name: str, cfg: Config) -> tuple[int, int]:
    """(student images, teacher images) per process and micro-step: the student sees every training stream,
    the teacher (when the stage runs one) the unlabelled images."""
    spec = STAGE_SPECS[name]
    student = sum(per_process_batch(s, cfg) for s in spec.streams if s != "evaluation")
    return student, per_process_batch("unlabelled", cfg) if spec.cost.teacher_forward else 0


def memory_rows(name: str, cfg: Config, params: int, trainable: int, world: int, act: int,
                checkpointing: bool) -> dict[str, int]:
    spec = ARCHS[cfg.model.arch]
    m = cfg.model
    student, teacher = micro_batch(name, cfg)
    if STAGE_SPECS[name].model.activations == "mae":
        per_image = mae_activation_bytes(spec, m.img_size, m.in_chans, cfg.mae.mask_ratio, cfg.mae.decoder_dim,
                                         cfg.mae.decoder_depth, cfg.mae.decoder_heads, m.attn_backend, act)
    else:
        per_image = vit_activation_bytes(spec, m.img_size, m.in_chans, m.num_classes, m.global_pool,
                                         m.attn_backend, act, checkpointing)
    image = m.in_chans * m.img_size ** 2 * 4
    fsdp = cfg.dist.strategy == "fsdp" and world > 1
    rows = dict(state_bytes(name, cfg, params, trainable, world if fsdp else 1))
    if fsdp:  # FSDP2: two blocks unsharded at a time (the current one and the prefetched next), bf16 on a GPU
        d, ratio = spec["embed_dim"], spec.get("mlp_ratio", 4.0)
        block = int(4 * d * d + 2 * ratio * d * d + 10 * d)
        rows["FSDP all-gathered blocks"] = 2 * block * act
    elif world > 1:
        rows["DDP gradient buckets"] = trainable * 4
    if act == 2 and not fsdp:
        rows["autocast bf16 weight copies"] = params * 2
    # loader batches (semi: labelled + weak + strong) and the mixed copies the student reads
    rows["input batches"] = (student + teacher) * image + student * image
    rows["activations (saved for backward)"] = student * per_image
    return rows


def state_bytes(name: str, cfg: Config, params: int, trainable: int, shards: int) -> dict[str, int]:
    """Bytes per rank of the fp32 weights, gradients, AdamW moments and EMA, split over `shards` ranks
    (FSDP2) or whole on every rank (DDP: shards = 1)."""
    rows = {"parameters (fp32)": params * 4 // shards, "gradients": trainable * 4 // shards,
            "AdamW moments": trainable * 8 // shards}
    cost = STAGE_SPECS[name].cost
    if cost.ema_row and (cfg.ema.enabled or not cost.ema_optional):
        rows[cost.ema_row] = params * 4 // shards
    return rows


def precision_bytes(cfg: Config) -> int:
    """Bytes per matmul activation on a GPU: bf16 unless the recipe forces fp32."""
    return 4 if cfg.run.precision == "fp32" else 2


def stage_flops(name: str, cfg: Config, gflops: float, world: int) -> float:
    """FLOPs of one optimizer step, all processes together."""
    student, teacher = micro_batch(name, cfg)
    passes = 4 if cfg.model.grad_checkpointing else 3
    per_micro = gflops * 1e9 * (passes * student + teacher)
    return per_micro * cfg.optim.accum_steps * world


def measured_throughput(key: str, arch: str, results: Path | None = None) -> tuple[float, str] | None:
    """(achieved TFLOP/s per GPU, where from) from the newest GPU-suite JSON for this GPU, if any."""
    results = results or RESULTS
    want = GPUS[key].match
    found = []
    for path in sorted(results.glob("gpu-*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if report.get("smoke") or not all(s in report.get("device", "") for s in want):
            continue
        found.append((report.get("date", ""), path, report))
    if not found:
        return None
    _, path, report = max(found, key=lambda f: f[0])
    steps = [s for s in report.get("semi_step", []) if s.get("mfu")]
    same = [s for s in steps if s["arch"] == arch]
    if same:
        return same[0]["achieved_tflops"], f"measured for {arch} in {path.name}"
    if steps:  # another arch on this GPU: carry its MFU over to the spec peak
        s = max(steps, key=lambda s: s["mfu"])
        return None if not s.get("mfu") else (s["mfu"] * report["matmul_peak_tflops_bf16"],
                                               f"MFU {100 * s['mfu']:.0f} % measured for {s['arch']} in {path.name}")
    return None


def human_flops(f: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if f >= scale:
            return f"{f / scale:.3g} {unit}"
    return f"{f:.3g} FLOP"


def human_time(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min"


# --- the disk a run keeps ----------------------------------------------------------------------------------

TENSOR_OVERHEAD = 2560  # serialisation around each stored tensor (a DCP chunk's record and metadata: ~2.4 KiB)
RNG_STATE = 16 * 2**10  # each rank's random-generator states in a resumable checkpoint


@dataclass(frozen=True)
class ModelSize:
    params: int
    trainable: int
    tensors: int  # parameter tensors
    trainable_tensors: int


def keeps_ema(name: str, cfg: Config) -> bool:
    cost = STAGE_SPECS[name].cost
    return bool(cost.ema_row) and (cfg.ema.enabled or not cost.ema_optional)


def checkpoint_bytes(name: str, cfg: Config, size: ModelSize, world: int = 1) -> dict[str, int]:
    """Bytes a training stage on `world` processes leaves in RUN/checkpoints/, all ranks together:
    `checkpoint.keep` rolling checkpoints plus the one being written before the oldest is removed (fp32
    weights, EMA, AdamW moments and step, every rank's random states), the best evaluation and the final
    weights (weights and EMA), each tensor with its serialisation record. Under FSDP2 a rolling checkpoint is
    a folder of one file per rank with the same tensor bytes and one record per tensor and rank."""
    shards = world if cfg.dist.strategy == "fsdp" else 1
    copies = 2 if keeps_ema(name, cfg) else 1
    weights = copies * (size.params * 4 + size.tensors * TENSOR_OVERHEAD)
    optimizer = size.trainable * 8 + 3 * size.trainable_tensors * TENSOR_OVERHEAD  # two moments and a step
    records = (copies * size.tensors + 3 * size.trainable_tensors) * TENSOR_OVERHEAD * (shards - 1)
    resumable = weights + optimizer + records + world * RNG_STATE
    keep = cfg.checkpoint.keep
    return {f"rolling checkpoints ({keep} kept + 1 being written)": (keep + 1) * resumable,
            "best checkpoint": weights, "final checkpoint": weights}


def export_bytes(size: ModelSize, cfg: Config) -> int:
    """model.safetensors: the last stage's teacher (or model), fp32."""
    return size.params * 4 + size.tensors * TENSOR_OVERHEAD if cfg.checkpoint.export_safetensors else 0


def run_disk_bytes(plan, world: int = 1) -> tuple[int, list[str]]:
    """(bytes the whole run keeps in its folder, one line per part) for a RunPlan on `world` processes: every
    training stage's checkpoints (each stage keeps its own) and the export."""
    total, lines, last = 0, [], None
    for name, cfg in plan.stages.items():
        if not STAGE_SPECS[name].trains:
            continue
        size = model_size(name, cfg)
        rows = checkpoint_bytes(name, cfg, size, world)
        total += sum(rows.values())
        lines.append(f"[{name}] " + ", ".join(f"{k} {human_bytes(v)}" for k, v in rows.items()))
        last = (size, cfg)
    if last is not None and export_bytes(*last):
        total += export_bytes(*last)
        lines.append(f"model.safetensors {human_bytes(export_bytes(*last))}")
    return total, lines


def model_size(name: str, cfg: Config) -> ModelSize:
    """The stage's model, built on the meta device (no memory), counted."""
    with torch.device("meta"):
        model = STAGE_SPECS[name].model.build(cfg)
    return size_of(model)


def size_of(model) -> ModelSize:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return ModelSize(param_count(model), param_count(model, trainable_only=True),
                     len(list(model.parameters())), len(trainable))


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"
