"""Pseudo labels (kernels/pseudo_label.py): every implementation against the reference, then
behaviour of the public function, the native op and the Triton op."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import impl_device
from kernel_cases import FLOATS, LOGIT_CASES, TOL, awkward_logits, gen, runs

from kernels import KernelUnavailable, pseudo_label, pseudo_label_reference


@pytest.mark.parametrize("case", LOGIT_CASES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS)
def test_pseudo_label_matches_the_reference_on_every_implementation(impl, case, dtype):
    logits = awkward_logits(*case, dtype, seed=sum(case))
    dev = impl_device(impl)
    if not runs(impl, dtype):
        with pytest.raises(KernelUnavailable, match="float64"):
            pseudo_label(logits.to(dev), 0.3, backend=impl)
        return
    prob, label, mask = pseudo_label(logits.to(dev), 0.3, backend=impl)
    ref_prob, ref_label, _ = pseudo_label_reference(logits, 0.3)
    assert prob.dtype == mask.dtype == torch.float32 and label.dtype == torch.int64
    torch.testing.assert_close(prob.cpu(), ref_prob, **TOL[torch.float32])  # softmax in float32 everywhere
    assert torch.equal(label.cpu(), ref_label)  # the first maximum, exactly
    assert torch.equal(mask.cpu(), (prob.cpu() >= 0.3).float())


# ------------------------------------------------------------------------- public function, per backend

@pytest.mark.usefixtures("kernels_backend")
def test_pseudo_label_known_values():
    # row 0: softmax max = e^2 / (e^2 + 1 + 1) = 0.7870 at index 0; row 1: uniform over 4 = 0.25;
    # row 2: max = 1 / (1 + e^-1 + e^-9) = 0.7310 at index 2; row 3: exactly at the threshold 0.5 -> kept
    logits = torch.tensor(
        [[2.0, 0.0, 0.0, -math.inf], [1.0, 1.0, 1.0, 1.0], [-9.0, -1e4, 0.0, -1.0], [3.0, 3.0, -math.inf, -math.inf]]
    )
    prob, label, mask = pseudo_label(logits, threshold=0.5)
    expect = torch.tensor([math.exp(2) / (math.exp(2) + 2), 0.25, 1 / (1 + math.exp(-1) + math.exp(-9)), 0.5])
    torch.testing.assert_close(prob, expect)
    assert label[0] == 0 and label[2] == 2 and label[3] in (0, 1)
    assert torch.equal(mask, torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert prob.dtype == mask.dtype == torch.float32 and label.dtype == torch.int64
    # thresholds just either side of row 0's 0.7870 and row 2's 0.7310
    assert torch.equal(pseudo_label(logits, threshold=0.786)[2], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.equal(pseudo_label(logits, threshold=0.788)[2], torch.zeros(4))
    assert torch.equal(pseudo_label(logits, threshold=0.730)[2], torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert torch.equal(pseudo_label(logits, threshold=0.732)[2], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.equal(pseudo_label(logits.bfloat16(), threshold=0.5)[2], mask)  # bf16 input


@pytest.mark.usefixtures("kernels_backend")
def test_pseudo_label_matches_reference_and_bf16():
    z = torch.randn(37, 101, generator=gen(), dtype=torch.float32) * 3
    z.requires_grad_(True)
    out, ref = pseudo_label(z, 0.3), pseudo_label_reference(z, 0.3)
    assert not out[0].requires_grad
    torch.testing.assert_close(out[0], ref[0], rtol=1e-6, atol=1e-7)
    assert torch.equal(out[1], ref[1]) and torch.equal(out[2], ref[2])
    assert torch.equal(pseudo_label_reference(torch.tensor([[3.0, 3.0, -math.inf]]), 0.5)[2], torch.ones(1))
    # bf16 logits: softmax in float32 of the bf16 values
    zb = z.detach().bfloat16()
    prob, label, mask = pseudo_label(zb, 0.3)
    assert prob.dtype == torch.float32
    ref_prob = torch.softmax(zb.float(), -1).max(-1)
    torch.testing.assert_close(prob, ref_prob.values, rtol=1e-6, atol=1e-7)
    assert torch.equal(label, ref_prob.indices)
    assert torch.equal(mask, (prob >= 0.3).float())


# ------------------------------------------------------------------------------------ native op

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(("N", "C"), [(2, 3), (5, 7), (64, 1000), (6, 21841), (3, 1)])
def test_native_pseudo_label(native_ops, dtype, N, C):
    logits = (torch.randn(N, C, generator=gen(N * C)) * 4).to(dtype)
    prob, label, mask = native_ops.pseudo_label(logits, 0.3)
    ref_prob, ref_label, _ = pseudo_label_reference(logits, 0.3)
    assert prob.dtype == mask.dtype == torch.float32 and label.dtype == torch.int64
    assert torch.equal(label, ref_label)  # first maximum, exactly
    torch.testing.assert_close(prob, ref_prob, rtol=1e-5, atol=1e-7)  # the reference works in float32
    if dtype == torch.float64:  # the kernel in float64
        exact = torch.softmax(logits, dim=-1).amax(dim=-1).float()
        torch.testing.assert_close(prob, exact, rtol=1e-7, atol=0.0)
    assert torch.equal(mask, (prob >= 0.3).float())


def test_native_pseudo_label_ties_and_extremes(native_ops):
    logits = torch.tensor([
        [1.0, 5.0, 2.0, 5.0, 5.0],  # ties: the first maximum
        [0.0, 0.0, 0.0, 0.0, 0.0],  # uniform: prob 1/C
        [-1e4, 3.0, -float("inf"), 2.0, -3e38],  # huge negative gaps and -inf
        [80.0, -80.0, 0.0, 79.0, 1.0],
    ])
    prob, label, mask = native_ops.pseudo_label(logits, 0.5)
    ref_prob, ref_label, ref_mask = pseudo_label_reference(logits, 0.5)
    assert label.tolist() == ref_label.tolist() == [1, 0, 1, 0]
    torch.testing.assert_close(prob, ref_prob, rtol=1e-6, atol=1e-7)
    assert torch.equal(mask, ref_mask)
    # threshold compared in float32, like torch's prob >= threshold
    p = native_ops.pseudo_label(torch.zeros(1, 5), 0.2)[0]
    assert native_ops.pseudo_label(torch.zeros(1, 5), float(p))[2].item() == 1.0


def test_native_pseudo_label_errors(native_ops):
    with pytest.raises(RuntimeError, match="\\(N, C\\)"):
        native_ops.pseudo_label(torch.zeros(3), 0.5)
    with pytest.raises(RuntimeError, match="contiguous"):
        native_ops.pseudo_label(torch.zeros(4, 3).t(), 0.5)
    with pytest.raises(RuntimeError, match="float32/float64"):
        native_ops.pseudo_label(torch.zeros(2, 3, dtype=torch.int32), 0.5)


# ------------------------------------------------------------------------------------ Triton op

DEV = impl_device("triton")


@pytest.mark.parametrize("C,dtype", [(7, torch.float32), (1000, torch.float32), (1000, torch.bfloat16),
                                     (1000, torch.float16), (129, torch.float64), (21841, torch.float32),
                                     (21841, torch.bfloat16)])
def test_triton_pseudo_label(triton_ns, C, dtype):
    g = torch.Generator().manual_seed(C)
    z = (torch.randn(3, C, generator=g) * 4).to(dtype)
    z[1, 2] = z[1].max() + 1  # a tie: the first index wins
    z[1, C - 1] = z[1, 2]
    z[2] = z[2, 0]  # all equal: prob 1 / C, label 0
    prob, label, mask = triton_ns.pseudo_label(z.to(DEV), 0.05)
    rp, rl, rm = pseudo_label_reference(z, 0.05)
    torch.testing.assert_close(prob.cpu(), rp, atol=1e-6, rtol=1e-5)
    assert label.dtype == torch.int64 and torch.equal(label.cpu(), rl)
    assert label[1] == 2 and label[2] == 0
    assert mask.dtype == torch.float32 and torch.equal(mask.cpu(), rm)


