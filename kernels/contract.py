"""The operator contract, stated once: each op's schema, its input check and its fake implementation.

Both backends register these ops, each in its namespace: the Triton module (``semivit_triton``, from
this table) and the native library (``semivit_native``; its C++ ``m.def`` strings are tested to equal
this table, ``tests/unit/test_kernel_contract.py``). The semantics of each op are in docs/kernels.md.

``check_<op>``: the metadata-only input check (shapes, dtypes, layout; no host sync). The Triton ops
run it on every call and both backends' fakes run it while tracing; the native CPU kernels repeat it in
C++, where they also check values (label and box ranges, that ``partner`` is a permutation).
``register_fakes(namespace)``: the fake (meta) implementations, output shapes and dtypes only, so the
ops run on the meta device and trace under ``torch.compile(fullgraph=True)``.

Dtypes: ``FLOATS`` everywhere, except that the Triton kernels compute with float32 scalars, so the
Triton EMA and soft-target CE reject float64 (the dispatcher's ``auto`` sends it to native or torch).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

__all__ = ["FLOATS", "FLOATS_32", "OPS", "SCHEMAS", "Op", "check_ema_update_", "check_mix", "check_pseudo_label",
           "check_soft_target_ce", "compute_dtype", "register_fakes"]

FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
FLOATS_32 = (torch.float32, torch.bfloat16, torch.float16)  # Triton's EMA and soft-target CE
_NAMES = {torch.float32: "float32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "float64"}

_MIX_ARGS = "Tensor use_cutmix, Tensor cy, Tensor cx, Tensor partner"


class Op(NamedTuple):
    schema: str  # arguments -> results, as torch.library writes it after the name
    namespaces: tuple[str, ...]  # which backends register it
    mutates: tuple[str, ...]  # arguments written in place


_BOTH = ("semivit_native", "semivit_triton")
OPS: dict[str, Op] = {
    "ema_update_": Op("(Tensor(a!)[] teacher, Tensor[] student, float decay) -> ()", _BOTH, ("teacher",)),
    "pseudo_label": Op("(Tensor logits, float threshold) -> (Tensor prob, Tensor label, Tensor mask)", _BOTH, ()),
    "pseudo_mixup": Op(f"(Tensor images, Tensor prob, {_MIX_ARGS}, float threshold) "
                       "-> (Tensor mixed, Tensor lam, Tensor mask)", _BOTH, ()),
    "mix_batch": Op(f"(Tensor images, Tensor lam, {_MIX_ARGS}) -> (Tensor mixed, Tensor lam)", _BOTH, ()),
    "pseudo_mixup_": Op(f"(Tensor(a!) images, Tensor prob, {_MIX_ARGS}, float threshold) "
                        "-> (Tensor lam, Tensor mask)", ("semivit_native",), ("images",)),
    "mix_batch_": Op(f"(Tensor(a!) images, Tensor lam, {_MIX_ARGS}) -> Tensor lam", ("semivit_native",), ("images",)),
    "soft_target_ce": Op("(Tensor logits, Tensor label_a, Tensor label_b, Tensor lam, Tensor? mask, "
                         "float smoothing, bool with_grad) -> (Tensor loss, Tensor grad)", _BOTH, ()),
}
SCHEMAS = {name: op.schema for name, op in OPS.items()}


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    return "/".join(_NAMES[d] for d in dtypes)


def _check_vector(op: str, arg: str, t: Tensor, B: int, dtype: torch.dtype) -> None:
    if t.shape != (B,) or t.dtype != dtype:
        raise ValueError(f"{op}: {arg} must be ({B},) {dtype}, got {tuple(t.shape)} {t.dtype}")


def check_ema_update_(teacher: list[Tensor], student: list[Tensor], decay: float,
                      dtypes: tuple[torch.dtype, ...] = FLOATS) -> None:
    if len(teacher) != len(student):
        raise ValueError(f"teacher has {len(teacher)} tensors but student has {len(student)}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    for i, (t, s) in enumerate(zip(teacher, student)):
        if t.dtype not in dtypes or s.dtype not in dtypes:
            raise ValueError(f"ema_update_: tensor {i}: teacher {t.dtype} / student {s.dtype}; supported are "
                             f"{_dtype_names(dtypes)} (other dtypes, integer tensors included, go to another "
                             "backend or are copied by ema_update)")
        if t.numel() != s.numel():
            raise ValueError(f"tensor {i}: teacher has {t.numel()} elements, student {s.numel()}")
        if t.device != s.device:
            raise ValueError(f"tensor {i}: teacher on {t.device}, student on {s.device}")
        if not (t.is_contiguous() and s.is_contiguous()):
            raise ValueError(f"tensor {i}: teacher and student must be contiguous")


def check_pseudo_label(logits: Tensor, dtypes: tuple[torch.dtype, ...] = FLOATS) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, C), got shape {tuple(logits.shape)}")
    if logits.dtype not in dtypes:
        raise ValueError(f"pseudo_label: logits must be {_dtype_names(dtypes)}, got {logits.dtype}")


def check_mix(op: str, images: Tensor, w: Tensor, use_cutmix: Tensor, cy: Tensor, cx: Tensor,
              partner: Tensor) -> None:
    """pseudo_mixup / mix_batch and their in-place forms; ``w`` is ``prob`` or ``lam``."""
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if images.dtype not in FLOATS:
        raise ValueError(f"{op}: images must be {_dtype_names(FLOATS)}, got {images.dtype}")
    B = images.shape[0]
    for arg, t, dtype in (("prob" if op.startswith("pseudo") else "lam", w, torch.float32),
                          ("use_cutmix", use_cutmix, torch.bool), ("cy", cy, torch.int64),
                          ("cx", cx, torch.int64), ("partner", partner, torch.int64)):
        _check_vector(op, arg, t, B, dtype)


def check_soft_target_ce(logits: Tensor, label_a: Tensor, label_b: Tensor, lam: Tensor, mask: Tensor | None,
                         dtypes: tuple[torch.dtype, ...] = FLOATS) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, C), got shape {tuple(logits.shape)}")
    if logits.dtype not in dtypes:
        raise ValueError(f"soft_target_ce: logits must be {_dtype_names(dtypes)} (other dtypes go to another "
                         f"backend), got {logits.dtype}")
    B = logits.shape[0]
    checked = [("label_a", label_a, torch.int64), ("label_b", label_b, torch.int64), ("lam", lam, torch.float32)]
    for arg, t, dtype in checked + ([] if mask is None else [("mask", mask, torch.float32)]):
        _check_vector("soft_target_ce", arg, t, B, dtype)


def compute_dtype(logits: Tensor) -> torch.dtype:
    """The loss and gradient dtype of soft_target_ce: float64 for float64 logits, else float32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- fake implementations


def _fakes(dtypes: tuple[torch.dtype, ...]) -> dict[str, Callable]:
    """The fakes for a backend whose EMA and soft-target CE accept ``dtypes``."""

    def ema_update_(teacher, student, decay):
        check_ema_update_(teacher, student, decay, dtypes)

    def pseudo_label(logits, threshold):
        check_pseudo_label(logits)
        B = logits.shape[0]
        return (logits.new_empty(B, dtype=torch.float32), logits.new_empty(B, dtype=torch.int64),
                logits.new_empty(B, dtype=torch.float32))

    def pseudo_mixup(images, prob, use_cutmix, cy, cx, partner, threshold):
        check_mix("pseudo_mixup", images, prob, use_cutmix, cy, cx, partner)
        B = images.shape[0]
        return (torch.empty_like(images, memory_format=torch.contiguous_format),
                images.new_empty(B, dtype=torch.float32), images.new_empty(B, dtype=torch.float32))

    def mix_batch(images, lam, use_cutmix, cy, cx, partner):
        check_mix("mix_batch", images, lam, use_cutmix, cy, cx, partner)
        return (torch.empty_like(images, memory_format=torch.contiguous_format),
                images.new_empty(images.shape[0], dtype=torch.float32))

    def pseudo_mixup_(images, prob, use_cutmix, cy, cx, partner, threshold):
        check_mix("pseudo_mixup_", images, prob, use_cutmix, cy, cx, partner)
        B = images.shape[0]
        return images.new_empty(B, dtype=torch.float32), images.new_empty(B, dtype=torch.float32)

    def mix_batch_(images, lam, use_cutmix, cy, cx, partner):
        check_mix("mix_batch_", images, lam, use_cutmix, cy, cx, partner)
        return images.new_empty(images.shape[0], dtype=torch.float32)

    def soft_target_ce(logits, label_a, label_b, lam, mask, smoothing, with_grad):
        check_soft_target_ce(logits, label_a, label_b, lam, mask, dtypes)
        dt = compute_dtype(logits)
        return (logits.new_empty((), dtype=dt),
                logits.new_empty(tuple(logits.shape) if with_grad else (0,), dtype=dt))

    return {f.__name__: f for f in (ema_update_, pseudo_label, pseudo_mixup, mix_batch, pseudo_mixup_, mix_batch_,
                                    soft_target_ce)}


def register_fakes(namespace: str, names: tuple[str, ...] | None = None) -> None:
    """Register the fakes of ``names`` (default: every op ``namespace`` defines), once the ops are defined."""
    fakes = _fakes(FLOATS_32 if namespace == "semivit_triton" else FLOATS)
    for name in names or [n for n, op in OPS.items() if namespace in op.namespaces]:
        torch.library.register_fake(f"{namespace}::{name}", fakes[name])
