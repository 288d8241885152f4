"""``semivit_triton::ema_update_``: the EMA-teacher update of every tensor in ONE kernel launch.

    t <- t + w (s - t),  w = 1 - decay, computed in float32, rounded once to the teacher's dtype.
Schema, input check and fake: ``kernels.contract``.

Design (multi-tensor pointer table). The tensors are split into chunks of ``CONFIG["chunk"]``
elements; one program per chunk. A single int64 table on the device holds

    [teacher data_ptr x n | student data_ptr x n | numel x n | tensor index x m | chunk-in-tensor x m]

(n tensors, m chunks). Each program reads its chunk's entry, loads the two data pointers, casts them
to typed pointers (``.to(tl.pointer_type(dtype))``), and lerps its chunk in tiles of
``CONFIG["block"]``: full chunks without masks (vectorised 16-byte accesses when every pointer is
16-byte aligned, which is checked on the host and passed as a hint), the last chunk of a tensor
masked. The table is built once per set of tensors (a "plan", keyed by data pointers, numels and
dtypes; a small LRU cache), so a training step does no host-to-device copy and no host sync: its host
work is reading ``data_ptr()`` / ``numel()`` / dtype of each tensor (a few C-level ``map``s) and one
launch per (teacher dtype, student dtype) group, i.e. one launch in the usual all-float32 (or float32
teacher / bf16 student) case.

The same kernel runs under the Triton interpreter (``TRITON_INTERPRET=1``) on CPU tensors: the
interpreter accepts the int64 -> pointer cast and dereferences the raw host addresses, so the tests
exercise exactly this code path (one "launch" per group there too).

Registered with ``torch.library.custom_op`` (not ``triton_op``): the pointer table needs real data
pointers, which a traced (fake / functional) tensor does not have, so ``torch.compile`` treats this op
as an opaque call (it still compiles with ``fullgraph=True``; the fake impl returns nothing).

Dtypes: teacher float32 / bf16 / fp16, student float32 / bf16 / fp16 (numels equal). float64 is
rejected with a ValueError (the Triton scalar ``w`` is float32); route float64 to another backend.
Teachers and students must be contiguous (ValueError otherwise; the public function makes them so).
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from contextlib import nullcontext

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels import contract

__all__ = ["CONFIG", "clear_cache", "ema_update_", "ema_update_impl"]

# Tuning knobs (read at each call; the GPU bench sweeps them). chunk must be a multiple of block.
CONFIG = {"block": 2048, "chunk": 8192, "num_warps": 4}
_CACHE_SIZE = 8
_cache: OrderedDict = OrderedDict()

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _ema_kernel(table_ptr, n_tensors, w, T_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
                BLOCK: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    n_chunks = tl.num_programs(0)
    k = tl.load(table_ptr + 3 * n_tensors + pid)  # tensor index of this chunk
    local = tl.load(table_ptr + 3 * n_tensors + n_chunks + pid).to(tl.int32)  # chunk within the tensor
    n = tl.load(table_ptr + 2 * n_tensors + k).to(tl.int32)  # numel of that tensor
    t_ptr = tl.load(table_ptr + k).to(tl.pointer_type(T_DTYPE))
    s_ptr = tl.load(table_ptr + n_tensors + k).to(tl.pointer_type(S_DTYPE))
    if ALIGNED:  # every base pointer is 16-byte aligned (checked on the host)
        t_ptr = tl.multiple_of(t_ptr, 16)
        s_ptr = tl.multiple_of(s_ptr, 16)
    start = local * CHUNK
    lanes = tl.arange(0, BLOCK)
    if start + CHUNK <= n:  # full chunk: no masks
        for i in tl.range(0, CHUNK, BLOCK):
            offs = start + i + lanes
            t = tl.load(t_ptr + offs).to(tl.float32)
            s = tl.load(s_ptr + offs).to(tl.float32)
            tl.store(t_ptr + offs, (t + w * (s - t)).to(T_DTYPE))
    else:  # the tensor's last, partial chunk
        for i in tl.range(0, CHUNK, BLOCK):
            offs = start + i + lanes
            m = offs < n
            t = tl.load(t_ptr + offs, mask=m, other=0.0).to(tl.float32)
            s = tl.load(s_ptr + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(t_ptr + offs, (t + w * (s - t)).to(T_DTYPE), mask=m)


def clear_cache() -> None:
    """Drop the cached launch plans (they are rebuilt on the next call)."""
    _cache.clear()


def _check(teacher: list[Tensor], student: list[Tensor], decay: float) -> None:
    contract.check_ema_update_(teacher, student, decay, contract.FLOATS_32)
    for i, t in enumerate(teacher):
        if t.numel() >= 2**31 - 2 * CONFIG["chunk"]:
            raise ValueError(f"tensor {i}: {t.numel()} elements is too many for int32 offsets")


def _plan(teacher: list[Tensor], student: list[Tensor], chunk: int) -> list[tuple]:
    """One launch per (device, teacher dtype, student dtype) group: (table, n_tensors, n_chunks, aligned,
    teacher tl dtype, student tl dtype, device). The only host-to-device copy, done once per set of tensors."""
    groups: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
    for t, s in zip(teacher, student):
        if t.numel():
            ts, ss = groups.setdefault((t.device, t.dtype, s.dtype), ([], []))
            ts.append(t)
            ss.append(s)
    plan = []
    for (device, t_dtype, s_dtype), (ts, ss) in groups.items():
        t_ptrs = [t.data_ptr() for t in ts]
        s_ptrs = [s.data_ptr() for s in ss]
        numels = [t.numel() for t in ts]
        chunk_tensor: list[int] = []
        chunk_local: list[int] = []
        for k, n in enumerate(numels):
            c = triton.cdiv(n, chunk)
            chunk_tensor += [k] * c
            chunk_local += range(c)
        table = torch.tensor(t_ptrs + s_ptrs + numels + chunk_tensor + chunk_local, dtype=torch.int64).to(device)
        aligned = all(p % 16 == 0 for p in t_ptrs + s_ptrs)
        plan.append((table, len(ts), len(chunk_tensor), aligned, _TL[t_dtype], _TL[s_dtype], device))
    return plan


_dtype = operator.attrgetter("dtype")


def ema_update_impl(teacher: list[Tensor], student: list[Tensor], decay: float) -> None:
    """In place: t <- t + (1 - decay)(s - t) for every pair, one launch per (dtype, dtype) group.

    The body of ``torch.ops.semivit_triton.ema_update_``, callable directly in eager mode: the custom-op
    dispatcher's per-tensor handling of two ~400-tensor lists costs host time the kernel itself does not."""
    if len(teacher) != len(student) or not 0.0 <= decay <= 1.0:
        _check(teacher, student, decay)
    block, chunk, warps = CONFIG["block"], CONFIG["chunk"], CONFIG["num_warps"]
    if chunk % block:
        raise ValueError(f"CONFIG chunk {chunk} must be a multiple of block {block}")
    # the plan is keyed by everything it depends on: addresses, sizes, dtypes (cheap C-level maps)
    key = (chunk, tuple(map(Tensor.data_ptr, teacher)), tuple(map(Tensor.data_ptr, student)),
           tuple(map(Tensor.numel, teacher)), tuple(map(Tensor.numel, student)),
           tuple(map(_dtype, teacher)), tuple(map(_dtype, student)))
    plan = _cache.get(key)
    if plan is None or not (all(map(Tensor.is_contiguous, teacher)) and all(map(Tensor.is_contiguous, student))):
        _check(teacher, student, decay)
        plan = _cache[key] = _plan(teacher, student, chunk)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
    for table, n_tensors, n_chunks, aligned, t_dtype, s_dtype, device in plan:
        with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
            _ema_kernel[(n_chunks,)](table, n_tensors, 1.0 - decay, t_dtype, s_dtype,
                                     BLOCK=block, CHUNK=chunk, ALIGNED=aligned, num_warps=warps)


ema_update_ = torch.library.custom_op("semivit_triton::ema_update_", mutates_args=contract.OPS["ema_update_"].mutates,
                                      schema=contract.SCHEMAS["ema_update_"])(ema_update_impl)
contract.register_fakes("semivit_triton", ("ema_update_",))

