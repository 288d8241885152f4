"""Soft-target cross-entropy (kernels/soft_target_ce.py): every implementation and its gradient
against the reference, then behaviour of the public function, the native op and the Triton op."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import impl_device
from kernel_cases import FLOATS, LOGIT_CASES, TOL, ce_inputs, gen, runs, runs_float64

from kernels import KernelUnavailable, soft_target_cross_entropy, soft_target_cross_entropy_reference
from kernels.soft_target_ce import _SoftTargetCE


@pytest.mark.parametrize("case", LOGIT_CASES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS)
def test_soft_target_ce_and_its_gradient_match_the_reference_on_every_implementation(impl, case, dtype):
    B, C = case
    logits, label_a, label_b, lam = ce_inputs(B, C, dtype, seed=B + C)
    mask = (torch.arange(B) % 3 != 1).float()
    zr = logits.clone().requires_grad_()
    ref = soft_target_cross_entropy_reference(zr, label_a, label_b, lam, mask, 0.1)
    (ref * 1.5).backward()  # a non-unit upstream gradient
    dev = impl_device(impl)
    z = logits.to(dev).requires_grad_()
    args = (label_a.to(dev), label_b.to(dev), lam.to(dev), mask.to(dev), 0.1)
    if not runs(impl, dtype):
        with pytest.raises(KernelUnavailable, match="float64"):
            soft_target_cross_entropy(z, *args, backend=impl)
        return
    loss = soft_target_cross_entropy(z, *args, backend=impl)
    (loss * 1.5).backward()
    assert loss.dtype == torch.promote_types(dtype, torch.float32) and loss.shape == ()
    loss_tol = TOL[torch.float64] if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(loss.detach().cpu(), ref.detach(), **loss_tol)
    assert z.grad.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(z.grad.cpu(), zr.grad, rtol=max(tol["rtol"], 1e-5), atol=max(tol["atol"], 1e-7))


# ------------------------------------------------------------------------- public function, per backend

@pytest.mark.usefixtures("kernels_backend")
def test_soft_ce_hand_computed():
    s, C = 0.1, 3
    z = [[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]
    a, b, lam = [2, 0], [1, 1], [0.7, 0.4]
    logits = torch.tensor(z)
    la, lb, lt = torch.tensor(a), torch.tensor(b), torch.tensor(lam)

    # sample 0: t = 0.9*(0.7*e2 + 0.3*e1) + 0.1/3 ; sample 1: t = 0.9*(0.4*e0 + 0.6*e1) + 0.1/3
    t0 = [s / 3, 0.9 * 0.3 + s / 3, 0.9 * 0.7 + s / 3]
    t1 = [0.9 * 0.4 + s / 3, 0.9 * 0.6 + s / 3, s / 3]
    lse0 = math.log(math.exp(1.0) + math.exp(2.0) + math.exp(3.0))
    lse1 = math.log(math.exp(0.5) + math.exp(-1.0) + math.exp(2.0))
    ce0 = -(t0[0] * (1.0 - lse0) + t0[1] * (2.0 - lse0) + t0[2] * (3.0 - lse0))
    ce1 = -(t1[0] * (0.5 - lse1) + t1[1] * (-1.0 - lse1) + t1[2] * (2.0 - lse1))

    loss = soft_target_cross_entropy(logits, la, lb, lt, smoothing=s)
    assert loss.item() == pytest.approx((ce0 + ce1) / 2, rel=1e-6)
    # mask out sample 1: it still counts in the denominator
    masked = soft_target_cross_entropy(logits, la, lb, lt, torch.tensor([1.0, 0.0]), smoothing=s)
    assert masked.item() == pytest.approx(ce0 / 2, rel=1e-6)

    # gradient of sample 0 (mask [1, 0]): (softmax - t) / B ; sample 1: zero
    logits.requires_grad_(True)
    soft_target_cross_entropy(logits, la, lb, lt, torch.tensor([1.0, 0.0]), smoothing=s).backward()
    sm0 = [math.exp(v - lse0) for v in z[0]]
    torch.testing.assert_close(logits.grad[0], torch.tensor([(sm0[c] - t0[c]) / 2 for c in range(C)]))
    assert torch.equal(logits.grad[1], torch.zeros(C))


@pytest.mark.parametrize("B,C", [(1, 1), (5, 7), (13, 129)])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.usefixtures("kernels_backend")
def test_soft_ce_matches_reference(B, C, with_mask):
    g = gen(B * C)
    logits = (torch.randn(B, C, generator=g) * 4).requires_grad_(True)
    la, lb = torch.randint(0, C, (B,), generator=g), torch.randint(0, C, (B,), generator=g)
    lb[0] = la[0]  # same label twice
    lam = torch.rand(B, generator=g)
    mask = (torch.rand(B, generator=g) > 0.4).float() if with_mask else None
    ref_logits = logits.detach().clone().requires_grad_(True)
    out = soft_target_cross_entropy(logits, la, lb, lam, mask, 0.1)
    ref = soft_target_cross_entropy_reference(ref_logits, la, lb, lam, mask, 0.1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    gout = torch.rand((), generator=g) + 0.5  # a non-unit upstream gradient
    (out * gout).backward()
    (ref * gout).backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-7)


def test_soft_ce_gradcheck_float64(kernels_backend):
    if not runs_float64(kernels_backend):
        return
    g = gen(7)
    B, C = 4, 5
    logits = torch.randn(B, C, generator=g, dtype=torch.float64, requires_grad=True)
    la, lb = torch.randint(0, C, (B,), generator=g), torch.randint(0, C, (B,), generator=g)
    lam = torch.rand(B, generator=g, dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.5], dtype=torch.float64)
    idx = torch.stack((la, lb), dim=1)
    assert torch.autograd.gradcheck(lambda z: _SoftTargetCE.apply(z, idx, lam, mask, 0.1), (logits,))
    out = soft_target_cross_entropy(logits, la, lb, lam, mask, 0.1)
    assert out.dtype == torch.float64


@pytest.mark.usefixtures("kernels_backend")
def test_soft_ce_masked_samples_count_as_zero():
    g = gen(11)
    logits = torch.randn(6, 10, generator=g)
    la, lb = torch.randint(0, 10, (6,), generator=g), torch.randint(0, 10, (6,), generator=g)
    lam = torch.rand(6, generator=g)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    keep = mask.bool()
    full = soft_target_cross_entropy(logits, la, lb, lam, mask)
    sub = soft_target_cross_entropy(logits[keep], la[keep], lb[keep], lam[keep])
    torch.testing.assert_close(full, sub * 3 / 6)
    zero = soft_target_cross_entropy(logits, la, lb, lam, torch.zeros(6))
    assert zero.item() == 0.0


@pytest.mark.usefixtures("kernels_backend")
def test_soft_ce_bf16_close_to_float32():
    g = gen(12)
    z32 = torch.randn(16, 100, generator=g) * 3
    zb = z32.bfloat16().requires_grad_(True)
    la, lb = torch.randint(0, 100, (16,), generator=g), torch.randint(0, 100, (16,), generator=g)
    lam = torch.rand(16, generator=g)
    out = soft_target_cross_entropy(zb, la, lb, lam)
    assert out.dtype == torch.float32
    ref32 = z32.bfloat16().float().requires_grad_(True)  # same values, float32 path
    ref = soft_target_cross_entropy_reference(ref32, la, lb, lam)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, soft_target_cross_entropy(z32, la, lb, lam), rtol=2e-2, atol=2e-2)
    out.backward()
    ref.backward()
    assert zb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(zb.grad.float(), ref32.grad, rtol=1e-2, atol=1e-4)


# ------------------------------------------------------------------------------------ native op

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(("B", "C"), [(2, 3), (5, 7), (80, 1000), (4, 21841)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("with_mask", [True, False])
def test_native_soft_target_ce(native_ops, dtype, B, C, smoothing, with_mask):
    logits, label_a, label_b, lam = ce_inputs(B, C, dtype, seed=B + C)
    mask = (torch.arange(B) % 3 != 1).float() if with_mask else None
    compute = torch.promote_types(dtype, torch.float32)
    z = logits.clone().requires_grad_()
    loss, grad = native_ops.soft_target_ce(z, label_a, label_b, lam, mask, smoothing, True)
    assert loss.dtype == grad.dtype == compute and loss.shape == () and grad.shape == (B, C)
    assert loss.requires_grad and not grad.requires_grad
    loss.backward()
    zr = logits.clone().requires_grad_()
    ref = soft_target_cross_entropy_reference(zr, label_a, label_b, lam, mask, smoothing)
    ref.backward()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(loss, ref, **tol)
    assert z.grad.dtype == dtype
    rtol, atol = TOL[dtype]["rtol"], TOL[dtype]["atol"]
    torch.testing.assert_close(z.grad, zr.grad, rtol=max(rtol, 1e-5), atol=max(atol, 1e-7))
    # the forward's gradient is d loss / d logits in the compute dtype, rounded once to the logits' dtype
    assert torch.equal(grad.to(dtype), z.grad)
    alone, none = native_ops.soft_target_ce(logits, label_a, label_b, lam, mask, smoothing, False)
    assert none.shape == (0,) and torch.equal(alone, loss.detach())


def test_native_soft_target_ce_scales_by_the_upstream_gradient(native_ops):
    """The backward multiplies the saved d loss / d logits by the upstream gradient (any value, float32
    logits with a float64 loss above them included)."""
    logits, label_a, label_b, lam = ce_inputs(6, 7, torch.float32, seed=9)
    t = torch.full((6, 7), 0.1 / 7)
    t[torch.arange(6), label_a] += 0.9 * lam
    t[torch.arange(6), label_b] += 0.9 * (1 - lam)
    z = logits.clone().requires_grad_()
    loss, _ = native_ops.soft_target_ce(z, label_a, label_b, lam, None, 0.1, True)
    (loss.double() * -2.5).backward()
    torch.testing.assert_close(z.grad, -2.5 / 6 * (torch.softmax(logits, -1) - t), rtol=1e-5, atol=1e-6)


def test_native_soft_target_ce_gradcheck(native_ops):
    logits, label_a, label_b, lam = ce_inputs(3, 7, torch.float64, seed=11)
    z = logits.requires_grad_()
    mask = torch.tensor([1.0, 0.0, 0.5])
    # first derivatives only: the saved gradient is not differentiable again (as the torch version)
    def loss(x):
        return native_ops.soft_target_ce(x, label_a, label_b, lam, mask, 0.1, True)[0]

    assert torch.autograd.gradcheck(loss, (z,))


def test_native_soft_target_ce_errors(native_ops):
    logits, label_a, label_b, lam = ce_inputs(2, 3, torch.float32)
    with pytest.raises(RuntimeError, match="label_a\\[1\\] = 3 is outside"):
        native_ops.soft_target_ce(logits, torch.tensor([0, 3]), label_b, lam, None, 0.1, False)
    with pytest.raises(RuntimeError, match="lam must be Float"):
        native_ops.soft_target_ce(logits, label_a, label_b, lam.double(), None, 0.1, False)
    with pytest.raises(RuntimeError, match="mask must have shape \\(2,\\)"):
        native_ops.soft_target_ce(logits, label_a, label_b, lam, torch.ones(3), 0.1, False)
    with pytest.raises(RuntimeError, match="call it with with_grad=True"):
        native_ops.soft_target_ce(logits.requires_grad_(), label_a, label_b, lam, None, 0.1, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_native_soft_target_ce_gives_the_same_bits_on_every_instruction_set_copy(native_ops, monkeypatch, dtype):
    """Every copy the CPU runs (SEMIVIT_NATIVE_ISA forces a narrower one) gives identical loss and
    gradient: no FMA contraction, the same lane order. C = 1037 leaves tails after every lane width;
    very negative logits take the exp's lower clamp."""
    from kernels import native

    logits, a, b, lam = ce_inputs(6, 1037, dtype, seed=3)
    logits[1, :5] = -1e4
    logits[2, 7] = -200.0
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 1.0])
    monkeypatch.delenv(native.ISA_ENV, raising=False)
    widest = native.instruction_set()
    copies = ["avx512", "avx2", "baseline"]
    results = {}
    for isa in copies[copies.index(widest):]:
        monkeypatch.setenv(native.ISA_ENV, isa)
        assert native.instruction_set() == isa
        results[isa] = native_ops.soft_target_ce(logits, a, b, lam, mask, 0.1, True)
    loss, grad = results[widest]
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    for isa, (other_loss, other_grad) in results.items():
        assert torch.equal(other_loss, loss) and torch.equal(other_grad, grad), isa


# ------------------------------------------------------------------------------------ Triton op

DEV = impl_device("triton")
TOL_TRITON = TOL


@pytest.mark.parametrize("Bn,C,dtype", [(3, 7, torch.float32), (3, 1000, torch.float32), (3, 1000, torch.bfloat16),
                                        (3, 1000, torch.float16), (2, 21841, torch.float32)])
def test_triton_soft_target_ce_forward_backward(triton_ns, Bn, C, dtype):
    g = torch.Generator().manual_seed(C)
    z = (torch.randn(Bn, C, generator=g) * 3).to(dtype)
    a = torch.randint(0, C, (Bn,), generator=g)
    b = torch.randint(0, C, (Bn,), generator=g)
    b[0] = a[0]  # both labels the same class
    lam = torch.rand(Bn, generator=g)
    lam[-1] = 1.0
    mask = torch.ones(Bn)
    mask[1] = 0.0
    s = 0.1
    zt = z.detach().to(DEV).requires_grad_()
    loss, grad = triton_ns.soft_target_ce(zt, a.to(DEV), b.to(DEV), lam.to(DEV), mask.to(DEV), s, True)
    assert loss.dtype == grad.dtype == torch.float32 and loss.shape == () and not grad.requires_grad
    loss.backward()
    zr = z.detach().clone().requires_grad_()
    ref = soft_target_cross_entropy_reference(zr, a, b, lam, mask, s)
    ref.backward()
    torch.testing.assert_close(loss.detach().cpu(), ref.detach(), atol=2e-5, rtol=1e-5)
    assert zt.grad.dtype == dtype
    torch.testing.assert_close(zt.grad.cpu(), zr.grad, **TOL[dtype])
    assert torch.equal(zt.grad, grad.to(dtype))  # the backward scales the forward's gradient by 1
    alone, none = triton_ns.soft_target_ce(z.to(DEV), a.to(DEV), b.to(DEV), lam.to(DEV), mask.to(DEV), s, False)
    assert none.shape == (0,) and torch.equal(alone, loss.detach())


def test_triton_soft_target_ce_upstream_gradient_and_errors(triton_ns):
    z = torch.randn(2, 11)
    a, b, lam = torch.tensor([1, 10]), torch.tensor([0, 10]), torch.tensor([0.25, 0.5])
    zt = z.to(DEV).requires_grad_()
    loss, _ = triton_ns.soft_target_ce(zt, a.to(DEV), b.to(DEV), lam.to(DEV), None, 0.2, True)
    (loss * -3.0).backward()
    one_hot = torch.nn.functional.one_hot
    t = 0.8 * (lam[:, None] * one_hot(a, 11) + (1 - lam[:, None]) * one_hot(b, 11)) + 0.2 / 11
    torch.testing.assert_close(zt.grad.cpu(), -3.0 / 2 * (torch.softmax(z, -1) - t), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="float64"):
        triton_ns.soft_target_ce(z.double().to(DEV), a.to(DEV), b.to(DEV), lam.to(DEV), None, 0.1, False)
    with pytest.raises(ValueError, match="mask must be"):
        triton_ns.soft_target_ce(z.to(DEV), a.to(DEV), b.to(DEV), lam.to(DEV), torch.ones(3, device=DEV), 0.1, False)
    with pytest.raises(RuntimeError, match="with_grad=True"):
        triton_ns.soft_target_ce(z.to(DEV).requires_grad_(), a.to(DEV), b.to(DEV), lam.to(DEV), None, 0.1, False)


def test_triton_soft_target_ce_compiles_fullgraph_forward_and_backward(triton_ns):
    # the interpreter cannot run inside AOT tracing, so on the CPU this checks Dynamo capture (no graph
    # break, autograd through register_autograd); bench/gpu_kernels.py checks inductor on CUDA
    backend = "eager" if DEV.type == "cpu" else "inductor"
    z = torch.randn(4, 37, device=DEV)
    a, b = torch.tensor([0, 5, 36, 2], device=DEV), torch.tensor([1, 5, 0, 3], device=DEV)
    lam, mask = torch.rand(4, device=DEV), torch.tensor([1.0, 0.0, 1.0, 1.0], device=DEV)

    def loss_fn(x):
        loss, _ = triton_ns.soft_target_ce(x, a, b, lam, mask, 0.1, True)
        return loss

    zc = z.clone().requires_grad_()
    torch.compile(loss_fn, fullgraph=True, backend=backend)(zc).backward()
    zr = z.clone().requires_grad_()
    soft_target_cross_entropy_reference(zr, a, b, lam, mask, 0.1).backward()
    torch.testing.assert_close(zc.grad, zr.grad, atol=1e-6, rtol=1e-5)


