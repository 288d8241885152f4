"""EMA-teacher update: teacher <- decay * teacher + (1 - decay) * student.

Memory-bound (docs/kernels.md; docs/method.md, step 6): the floor is reading teacher and student and writing
teacher once, 12 bytes per float32 parameter. ``torch._foreach_lerp_`` gets there with a handful of multi-tensor
launches; the timm ``ModelEma`` loop (``mul_`` then ``add_`` per tensor) moves about 3x the bytes and launches
~4 kernels per tensor.

Public API: ``ema_update`` (dispatch: Triton / native / torch, see ``kernels.dispatch``),
``ema_update_reference`` (the spec), ``ema_tensors`` (what to pass).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kernels import dispatch

__all__ = ["ema_tensors", "ema_update", "ema_update_reference", "flatten_into_buffers"]


def ema_tensors(module: nn.Module, floating_only: bool = True) -> list[Tensor]:
    """Detached parameters then buffers of ``module``, in ``named_parameters`` / ``named_buffers`` order.

    With ``floating_only`` (the default) integer buffers such as BatchNorm's ``num_batches_tracked`` are
    left out; with ``floating_only=False`` they are included and ``ema_update`` copies them.
    The returned tensors share storage with the module, so updating them in place updates the module.
    """
    tensors = [p.detach() for _, p in module.named_parameters()]
    tensors += [b.detach() for _, b in module.named_buffers()]
    if floating_only:
        tensors = [t for t in tensors if t.is_floating_point()]
    return tensors


@torch.no_grad()
def flatten_into_buffers(module: nn.Module) -> list[Tensor]:
    """Move every float parameter and buffer of ``module`` into one contiguous buffer per
    (device, dtype), each becoming a view of it; values, names, shapes and ``state_dict`` are unchanged.
    For the EMA teacher, which no optimizer holds: its update then streams through one block of memory
    instead of ~150 (ViT-B) separate allocations. Returns ``ema_tensors(module)``.
    """
    slots = []  # (owner's dict, name, tensor), each tensor once (tied weights share one slot)
    seen: set[int] = set()
    for owner in module.modules():
        for table in (owner._parameters, owner._buffers):
            for name, t in table.items():
                if t is not None and t.is_floating_point() and id(t) not in seen:
                    seen.add(id(t))
                    slots.append((table, name, t))
    groups: dict[tuple[torch.device, torch.dtype], list[tuple]] = {}
    for slot in slots:
        groups.setdefault((slot[2].device, slot[2].dtype), []).append(slot)
    for (device, dtype), members in groups.items():
        flat = torch.empty(sum(t.numel() for _, _, t in members), device=device, dtype=dtype)
        for (table, name, t), view in zip(members, flat.split([t.numel() for _, _, t in members])):
            view = view.view(t.shape).copy_(t)
            if isinstance(t, nn.Parameter):
                t.data = view  # the same Parameter object (tied weights stay tied), new storage
            else:
                table[name] = view
    return ema_tensors(module)


def _check(teacher: list[Tensor], student: list[Tensor], decay: float) -> None:
    if len(teacher) != len(student):
        raise ValueError(f"teacher has {len(teacher)} tensors but student has {len(student)}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")


@torch.no_grad()
def ema_update_reference(teacher: list[Tensor], student: list[Tensor], decay: float) -> None:
    """The spec, one tensor at a time (timm ``ModelEma`` style). In place on ``teacher``."""
    _check(teacher, student, decay)
    for t, s in zip(teacher, student):
        if t.is_floating_point():
            t.mul_(decay).add_(s.to(t.dtype), alpha=1.0 - decay)
        else:
            t.copy_(s)  # integer state (num_batches_tracked) is copied, never averaged


def _group(teacher: list[Tensor], student: list[Tensor]):
    """Float pairs grouped by (device, teacher dtype, student dtype), and the non-float pairs to copy."""
    groups: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
    copies: list[tuple[Tensor, Tensor]] = []
    for t, s in zip(teacher, student):
        if t.is_floating_point():
            s = s if s.device == t.device else s.to(t.device)
            ts, ss = groups.setdefault((t.device, t.dtype, s.dtype), ([], []))
            ts.append(t)
            ss.append(s)
        else:
            copies.append((t, s))
    return groups, copies


@torch.no_grad()
def ema_update(teacher: list[Tensor], student: list[Tensor], decay: float, backend: str | None = None) -> None:
    """In place on every tensor of ``teacher``: float tensors are lerped toward ``student`` by
    ``1 - decay``; non-floating tensors are copied from ``student``. No host sync.

    Tensors are grouped by (device, dtype); each group is one call: a single Triton launch on CUDA,
    one OpenMP pass over every tensor natively on CPU, or one ``_foreach_lerp_`` with ``torch``.
    ``backend``: see ``kernels.dispatch`` (None = the process default, ``run.kernels``).
    """
    _check(teacher, student, decay)
    if not teacher:
        return
    groups, copies = _group(teacher, student)
    for (device, t_dtype, s_dtype), (ts, ss) in groups.items():
        impl = dispatch.resolve(backend, device, s_dtype if t_dtype == torch.float32 else t_dtype)
        if impl == "reference":
            ema_update_reference(ts, ss, decay)
        elif impl == "torch" or not all(t.is_contiguous() for t in ts):
            if s_dtype != t_dtype:
                ss = [s.to(t_dtype) for s in ss]
            torch._foreach_lerp_(ts, ss, 1.0 - decay)  # t + (1 - decay) * (s - t)
        else:
            ss = [s if s.is_contiguous() else s.contiguous() for s in ss]
            dispatch.op(impl, "ema_update_")(ts, ss, decay)
    for t, s in copies:
        t.copy_(s)  # integer state (num_batches_tracked) is copied, never averaged
