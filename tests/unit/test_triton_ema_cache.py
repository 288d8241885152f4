"""The Triton EMA's pointer table: one launch per dtype group, the table built once per set of
tensors and reused."""

from __future__ import annotations

import pytest
import torch
from conftest import impl_device

from kernels.ema import ema_update_reference

DEV = impl_device("triton")


@pytest.fixture
def triton_ema(triton_ns):
    from kernels.triton_ops import ema

    return ema


class _CountLaunches:
    """Stands in for the jitted kernel and counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]




def test_triton_ema_one_launch_per_dtype_group_matches_reference(triton_ns, triton_ema, monkeypatch):
    # small block / chunk so that tensors span several chunks (full, unmasked ones and a masked tail)
    monkeypatch.setitem(triton_ema.CONFIG, "block", 128)
    monkeypatch.setitem(triton_ema.CONFIG, "chunk", 512)
    triton_ema.clear_cache()
    g = torch.Generator().manual_seed(0)
    sizes = [(1,), (3,), (17, 5), (512,), (513,), (1031,), (7, 11, 3), (2048,), (0,), (2,)]
    teacher = [torch.randn(s, generator=g).to(DEV) for s in sizes]
    student32 = [torch.randn(s, generator=g).to(DEV) for s in sizes]
    # mixed students: fp32 for some tensors, bf16 for the others -> two (teacher, student) dtype groups
    student = [s if k % 2 else s.to(torch.bfloat16) for k, s in enumerate(student32)]
    reference = [t.clone() for t in teacher]
    counter = _CountLaunches(triton_ema._ema_kernel)
    monkeypatch.setattr(triton_ema, "_ema_kernel", counter)
    for decay in (0.999, 0.5, 0.0, 1.0):
        ema_update_reference(reference, student, decay)
        triton_ns.ema_update_(teacher, student, decay)
        for t, r in zip(teacher, reference):
            torch.testing.assert_close(t, r, atol=1e-6, rtol=1e-6)
    assert counter.launches == 2 * 4  # one per dtype group per update, never one per tensor
    assert len(triton_ema._cache) == 1  # one plan (a table per group), built once and reused
    plan = next(iter(triton_ema._cache.values()))
    triton_ns.ema_update_(teacher, student, 0.9)
    assert next(iter(triton_ema._cache.values())) is plan
    triton_ns.ema_update_(teacher[:3], student[:3], 0.9)  # another set of tensors: another plan
    assert len(triton_ema._cache) == 2
    triton_ema.clear_cache()

