"""The EMA-teacher update (kernels/ema.py): every implementation against the reference, then
behaviour of the public function, the native op and the Triton op."""

from __future__ import annotations

import pytest
import torch
from conftest import impl_device
from kernel_cases import EMA_SIZES, FLOATS, TOL, gen, runs, runs_float64
from torch import nn

from kernels import KernelUnavailable, ema_tensors, ema_update, ema_update_reference


@pytest.mark.parametrize("dtype", FLOATS)
def test_ema_update_matches_the_reference_on_every_implementation(impl, dtype):
    dev = impl_device(impl)
    g = gen(1)
    teacher = [torch.randn(n, generator=g).to(dtype) for n in EMA_SIZES]
    student = [torch.randn(n, generator=g).to(dtype) for n in EMA_SIZES]
    expected = [t.clone() for t in teacher]
    ema_update_reference(expected, student, 0.9)
    got, given = [t.to(dev) for t in teacher], [s.to(dev) for s in student]
    if not runs(impl, dtype):
        with pytest.raises(KernelUnavailable, match="float64"):
            ema_update(got, given, 0.9, backend=impl)
        return
    ema_update(got, given, 0.9, backend=impl)
    tol = {k: 2 * v for k, v in TOL[dtype].items()}  # the reference rounds twice (mul_, add_)
    for t, e in zip(got, expected):
        assert t.dtype == dtype
        torch.testing.assert_close(t.cpu(), e, **tol)


# ------------------------------------------------------------------------- public function, per backend



def _net(seed: int, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    net = net.to(dtype)
    with torch.no_grad():  # distinct, non-trivial buffers and integer state
        bn = net[1]
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.num_batches_tracked.fill_(seed + 3)
    return net


@pytest.mark.usefixtures("kernels_backend")
def test_ema_tensors_order_and_filtering():
    net = _net(0)
    names = [n for n, _ in net.named_parameters()] + [n for n, _ in net.named_buffers()]
    all_tensors = ema_tensors(net, floating_only=False)
    assert len(all_tensors) == len(names)
    floats = ema_tensors(net)
    assert [t.dtype for t in floats] == [torch.float64] * (len(names) - 1)  # num_batches_tracked dropped
    assert all(not t.requires_grad for t in floats)
    floats[0].add_(1.0)  # shares storage with the module
    assert torch.equal(floats[0], net[0].weight.detach())


@pytest.mark.parametrize("decay", [0.9999, 0.5, 0.0, 1.0])
def test_ema_update_moves_teacher_by_formula(decay, kernels_backend):
    if not runs_float64(kernels_backend):
        return
    teacher, student = _net(1), _net(2)
    t_list = ema_tensors(teacher, floating_only=False)
    s_list = ema_tensors(student, floating_only=False)
    before = [t.clone() for t in t_list]
    ema_update(t_list, s_list, decay)
    for t0, t1, s in zip(before, t_list, s_list):
        if t0.is_floating_point():
            torch.testing.assert_close(t1 - t0, (1 - decay) * (s - t0), rtol=0, atol=1e-14)
        else:
            assert torch.equal(t1, s)  # num_batches_tracked copied
    assert teacher[1].num_batches_tracked.item() == 5
    # student untouched
    for a, b in zip(s_list, ema_tensors(_net(2), floating_only=False)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ema_update_matches_reference(dtype, kernels_backend):
    if dtype == torch.float64 and not runs_float64(kernels_backend):
        return
    t_fast, t_ref, student = _net(1, dtype), _net(1, dtype), _net(2, dtype)
    # mixed list: floats and the integer buffer, several updates
    for _ in range(3):
        ema_update(ema_tensors(t_fast, False), ema_tensors(student, False), 0.9)
        ema_update_reference(ema_tensors(t_ref, False), ema_tensors(student, False), 0.9)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    for a, b in zip(ema_tensors(t_fast, False), ema_tensors(t_ref, False)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.usefixtures("kernels_backend")
def test_ema_update_mixed_dtypes_and_errors():
    t = [torch.zeros(3, dtype=torch.float32), torch.zeros(2, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.long)]
    s = [torch.ones(3, dtype=torch.float32), torch.ones(2, dtype=torch.bfloat16), torch.full((1,), 7)]
    ema_update(t, s, 0.75)
    assert torch.equal(t[0], torch.full((3,), 0.25))
    assert torch.equal(t[1], torch.full((2,), 0.25, dtype=torch.bfloat16))
    assert t[2].item() == 7
    with pytest.raises(ValueError, match="tensors"):
        ema_update(t, s[:2], 0.9)


# ------------------------------------------------------------------------------------ native op


_EMA_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
]


@pytest.mark.parametrize(("t_dtype", "s_dtype"), _EMA_PAIRS)
@pytest.mark.parametrize("decay", [0.0, 0.9997, 1.0])
def test_native_ema_update(native_ops, t_dtype, s_dtype, decay):
    g = gen(1)
    teacher = [torch.randn(n, generator=g).to(t_dtype) for n in EMA_SIZES]
    student = [torch.randn(n, generator=g).to(s_dtype) for n in EMA_SIZES]
    expected = [t.clone() for t in teacher]
    ema_update_reference(expected, student, decay)
    # the contract's formula, each step rounded like the kernel: t + w (s - t), w = 1 - decay
    compute = torch.promote_types(t_dtype, torch.float32)
    exact = [(t.to(compute) + (s.to(compute) - t.to(compute)) * (1.0 - decay)).to(t_dtype)
             for t, s in zip(teacher, student)]
    native_ops.ema_update_(teacher, student, decay)
    rtol, atol = TOL[t_dtype]["rtol"], TOL[t_dtype]["atol"]
    for t, e, x in zip(teacher, expected, exact):
        assert torch.equal(t, x)
        torch.testing.assert_close(t, e, rtol=2 * rtol, atol=2 * atol)  # the reference rounds twice


def test_native_ema_update_vit_sized_list(native_ops):
    """~150 tensors of mixed sizes, some very small, in one call."""
    g = gen(2)
    sizes = [int(s) for s in torch.randint(1, 5000, (150,), generator=g)]
    teacher = [torch.randn(n, generator=g) for n in sizes]
    student = [torch.randn(n, generator=g) for n in sizes]
    expected = [t + (s - t) * (1.0 - 0.99) for t, s in zip(teacher, student)]
    native_ops.ema_update_(teacher, student, 0.99)
    assert all(torch.equal(t, e) for t, e in zip(teacher, expected))


def test_native_ema_update_errors(native_ops):
    t = [torch.zeros(4)]
    with pytest.raises(RuntimeError, match="has 3"):
        native_ops.ema_update_(t, [torch.zeros(3)], 0.9)
    with pytest.raises(RuntimeError, match="contiguous"):
        native_ops.ema_update_([torch.zeros(4, 2).t()], [torch.zeros(8)], 0.9)
    with pytest.raises(RuntimeError, match="teacher\\[0\\]"):
        native_ops.ema_update_([torch.zeros(4, dtype=torch.int64)], [torch.zeros(4)], 0.9)
    with pytest.raises(RuntimeError, match="decay"):
        native_ops.ema_update_(t, [torch.zeros(4)], 1.5)


# ------------------------------------------------------------------------------------ Triton op

DEV = impl_device("triton")


def _ema_expected(teacher, student, decay):
    """t + (1 - decay)(s - t) in float32, rounded once (what the contract says)."""
    return [(t.float() + (1 - decay) * (s.float() - t.float())).to(t.dtype) for t, s in zip(teacher, student)]




@pytest.mark.parametrize("t_dtype,s_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.float32, torch.float16), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.bfloat16)])
def test_triton_ema_dtypes(triton_ns, t_dtype, s_dtype):
    g = torch.Generator().manual_seed(1)
    sizes = [(5,), (1280,), (33, 7), (1,)]
    teacher = [torch.randn(s, generator=g).to(DEV, t_dtype) for s in sizes]
    student = [torch.randn(s, generator=g).to(DEV, s_dtype) for s in sizes]
    expected = _ema_expected(teacher, student, 0.9)
    triton_ns.ema_update_(teacher, student, 0.9)
    for t, e in zip(teacher, expected):
        assert t.dtype == t_dtype
        torch.testing.assert_close(t, e, **TOL[t_dtype])


def test_triton_ema_rejects_what_it_cannot_do(triton_ns):
    t = torch.zeros(4, device=DEV)
    with pytest.raises(ValueError, match="float64"):
        triton_ns.ema_update_([t.double()], [t.double()], 0.9)
    with pytest.raises(ValueError, match="elements"):
        triton_ns.ema_update_([t], [torch.zeros(5, device=DEV)], 0.9)
    with pytest.raises(ValueError, match="contiguous"):
        triton_ns.ema_update_([torch.zeros(4, 4, device=DEV).t()], [torch.zeros(4, 4, device=DEV)], 0.9)
    with pytest.raises(ValueError, match="contiguous"):
        triton_ns.ema_update_([torch.zeros(4, 4, device=DEV)], [torch.zeros(4, 4, device=DEV).t()], 0.9)
    with pytest.raises(ValueError, match="decay"):
        triton_ns.ema_update_([t], [t.clone()], 1.5)


def test_triton_ema_compiles_as_an_opaque_op(triton_ns):
    teacher = [torch.zeros(5, device=DEV), torch.ones(3, device=DEV)]
    student = [torch.ones(5, device=DEV), torch.zeros(3, device=DEV)]

    @torch.compile(fullgraph=True, backend="aot_eager")  # functionalised through the fake impl
    def step(ts, ss):
        triton_ns.ema_update_(ts, ss, 0.75)

    step(teacher, student)
    torch.testing.assert_close(teacher[0], torch.full((5,), 0.25, device=DEV))
    torch.testing.assert_close(teacher[1], torch.full((3,), 0.75, device=DEV))


