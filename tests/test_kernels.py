"""Correctness of the kernels/ ops against their references and hand-computed values, once per backend
(torch, native, triton under the interpreter), each reached through the public functions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from kernels import (
    MixDraws,
    draw_mix_randomness,
    ema_tensors,
    ema_update,
    ema_update_reference,
    labelled_mixup,
    mix_batch,
    pseudo_label,
    pseudo_label_reference,
    pseudo_mixup,
    pseudo_mixup_reference,
    soft_target_cross_entropy,
    soft_target_cross_entropy_reference,
)
import kernels.dispatch
from kernels import KernelUnavailable
from kernels.pseudo_mixup import random_derangement
from kernels.soft_target_ce import _SoftTargetCE

pytestmark = pytest.mark.usefixtures("kernels_backend")


def _runs_float64(backend: str) -> bool:
    """Triton kernels compute in float32: for them a float64 test checks the clear refusal instead
    ('auto' sends float64 to native or torch)."""
    if backend != "triton":
        return True
    with pytest.raises(KernelUnavailable, match="float64 is not supported"):
        kernels.dispatch.resolve("triton", torch.device("cpu"), torch.float64)
    return False


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ EMA


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
    if not _runs_float64(kernels_backend):
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
    if dtype == torch.float64 and not _runs_float64(kernels_backend):
        return
    t_fast, t_ref, student = _net(1, dtype), _net(1, dtype), _net(2, dtype)
    # mixed list: floats and the integer buffer, several updates
    for _ in range(3):
        ema_update(ema_tensors(t_fast, False), ema_tensors(student, False), 0.9)
        ema_update_reference(ema_tensors(t_ref, False), ema_tensors(student, False), 0.9)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    for a, b in zip(ema_tensors(t_fast, False), ema_tensors(t_ref, False)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_ema_update_mixed_dtypes_and_errors():
    t = [torch.zeros(3, dtype=torch.float32), torch.zeros(2, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.long)]
    s = [torch.ones(3, dtype=torch.float32), torch.ones(2, dtype=torch.bfloat16), torch.full((1,), 7)]
    ema_update(t, s, 0.75)
    assert torch.equal(t[0], torch.full((3,), 0.25))
    assert torch.equal(t[1], torch.full((2,), 0.25, dtype=torch.bfloat16))
    assert t[2].item() == 7
    with pytest.raises(ValueError, match="tensors"):
        ema_update(t, s[:2], 0.9)


# --------------------------------------------------------------------------------- pseudo label


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


def test_pseudo_label_matches_reference_and_bf16():
    z = torch.randn(37, 101, generator=_gen(), dtype=torch.float32) * 3
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


# --------------------------------------------------------------------------------- pseudo mixup


def _mix_inputs(B=6, C=3, H=7, W=5, dtype=torch.float32, seed=0):
    g = _gen(seed)
    images = torch.randn(B, C, H, W, generator=g).to(dtype)
    prob = torch.rand(B, generator=g) * 0.9 + 0.1
    label = torch.randint(0, 10, (B,), generator=g)
    return images, prob, label


def _is_single_cycle(partner: torch.Tensor) -> bool:
    """partner visits every index once starting from 0 (one B-cycle)."""
    B, seen, i = partner.numel(), set(), 0
    for _ in range(B):
        seen.add(i)
        i = int(partner[i])
    return i == 0 and len(seen) == B


@pytest.mark.parametrize("B", [2, 6, 80])
def test_partner_is_a_derangement(B):
    for seed in range(20):
        d = draw_mix_randomness(B, 7, 5, 0.5, "cpu", _gen(seed))
        partner = d.partner
        assert partner.dtype == torch.int64 and partner.shape == (B,)
        assert torch.equal(partner.sort().values, torch.arange(B))  # a permutation
        assert not bool((partner == torch.arange(B)).any())  # no fixed points
        assert _is_single_cycle(partner)  # one B-cycle
        if B >= 3:  # hence no 2-cycles: nobody is their partner's partner
            assert not bool((partner[partner] == torch.arange(B)).any())
    assert torch.equal(draw_mix_randomness(2, 7, 5, 0.5, "cpu", _gen()).partner, torch.tensor([1, 0]))
    if B > 2:  # random, not a fixed pairing
        assert len({tuple(draw_mix_randomness(B, 7, 5, 0.5, "cpu", _gen(s)).partner.tolist()) for s in range(5)}) > 1


def test_random_derangement_covers_all_cycles():
    # B = 4: (4 - 1)! = 6 four-cycles, each with probability 1/6
    seen = {}
    g = _gen(1)
    for _ in range(600):
        key = tuple(random_derangement(4, "cpu", g).tolist())
        seen[key] = seen.get(key, 0) + 1
    assert len(seen) == 6 and all(_is_single_cycle(torch.tensor(k)) for k in seen)
    assert min(seen.values()) > 60  # expected 100 each


def test_draw_order_partner_last():
    # use_cutmix, cy, cx come first, from the same stream as before the partner existed
    B, H, W = 8, 9, 11
    d = draw_mix_randomness(B, H, W, 0.5, "cpu", _gen(7))
    g = _gen(7)
    assert torch.equal(d.use_cutmix, torch.rand(B, generator=g) < 0.5)
    assert torch.equal(d.cy, torch.randint(0, H, (B,), generator=g))
    assert torch.equal(d.cx, torch.randint(0, W, (B,), generator=g))
    assert torch.equal(d.partner, random_derangement(B, "cpu", g))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [6, 80])
def test_pseudo_mixup_matches_reference(seed, dtype, B):
    images, prob, label = _mix_inputs(B=B, dtype=dtype, seed=seed)
    _, _, H, W = images.shape
    draws = draw_mix_randomness(B, H, W, 0.5, "cpu", _gen(100 + seed))
    keep = images.clone()
    out = pseudo_mixup(images, prob, label, 0.6, draws=draws)
    ref = pseudo_mixup_reference(images, prob, label, 0.6, draws=draws)
    assert torch.equal(images, keep)  # input not modified
    assert out.images.dtype == dtype and out.images.shape == images.shape
    # float32: equal up to lerp's rounding (x_j + w (x_i - x_j) vs lam x_i + (1 - lam) x_j)
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.images, ref.images, **tol)
    assert torch.equal(out.lam, ref.lam) and out.lam.dtype == torch.float32
    assert torch.equal(out.label_a, label) and torch.equal(out.label_b, label[draws.partner])
    assert torch.equal(ref.label_b, label[draws.partner])
    assert torch.equal(out.mask, ref.mask)


@pytest.mark.parametrize("B", [6, 80])
def test_donated_batch_gives_the_same_mix(B, kernels_backend):
    """donate=True: the same mixed batch, lam and mask as without it; the native op writes it over the
    donated images (no new tensor), the others leave them alone and return a new one."""
    images, prob, label = _mix_inputs(B=B, H=9, W=11, seed=B)
    draws = draw_mix_randomness(B, 9, 11, 0.5, "cpu", _gen(7))
    kept = pseudo_mixup(images, prob, label, 0.6, draws=draws)
    donated = images.clone()
    got = pseudo_mixup(donated, prob, label, 0.6, draws=draws, donate=True)
    assert torch.equal(got.images, kept.images) and torch.equal(got.lam, kept.lam) and torch.equal(got.mask, kept.mask)
    assert (got.images is donated) == (kernels_backend == "native")
    for seed in range(4):  # labelled mixup (flip(0) pairs: 2-cycles), mixup and cutmix draws
        kept = labelled_mixup(images, label, generator=_gen(seed))
        got = labelled_mixup(images.clone(), label, generator=_gen(seed), donate=True)
        assert torch.equal(got.images, kept.images) and torch.equal(got.lam, kept.lam)


def test_pseudo_mixup_float64_keeps_precision(kernels_backend):
    if not _runs_float64(kernels_backend):
        return
    images, prob, label = _mix_inputs(dtype=torch.float64)
    d = draw_mix_randomness(6, 7, 5, 0.5, "cpu", _gen(9))
    out = pseudo_mixup(images, prob, label, 0.5, draws=d)
    ref = pseudo_mixup_reference(images, prob, label, 0.5, draws=d)
    assert out.images.dtype == torch.float64
    torch.testing.assert_close(out.images, ref.images, rtol=0, atol=1e-12)


def test_pseudo_mixup_same_generator_same_result():
    images, prob, label = _mix_inputs(B=8, H=9, W=11)
    a = pseudo_mixup(images, prob, label, 0.5, generator=_gen(3))
    b = pseudo_mixup_reference(images, prob, label, 0.5, generator=_gen(3))
    c = pseudo_mixup(images, prob, label, 0.5, draws=draw_mix_randomness(8, 9, 11, 0.5, "cpu", _gen(3)))
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-6)
    assert torch.equal(a.lam, b.lam) and torch.equal(a.label_b, b.label_b) and torch.equal(a.mask, b.mask)
    assert torch.equal(a.images, c.images) and torch.equal(a.label_b, c.label_b)


def _no_cut(B: int, partner: torch.Tensor) -> MixDraws:
    zeros = torch.zeros(B, dtype=torch.long)
    return MixDraws(torch.zeros(B, dtype=torch.bool), zeros, zeros, partner)


def test_pseudo_mixup_mixup_pairs():
    images, prob, label = _mix_inputs()
    B = images.shape[0]
    partner = random_derangement(B, "cpu", _gen(2))
    out = pseudo_mixup(images, prob, label, 0.5, draws=_no_cut(B, partner))
    p_j = prob[partner]
    torch.testing.assert_close(out.lam * (prob + p_j), prob)  # lam_i (p_i + p_j) = p_i
    torch.testing.assert_close(out.lam, prob / (prob + p_j))
    lam = out.lam[:, None, None, None]
    torch.testing.assert_close(out.images, lam * images + (1 - lam) * images[partner], rtol=0, atol=1e-6)
    assert torch.equal(out.label_b, label[partner])
    # equal confidences -> lam = 0.5 for everyone
    eq = pseudo_mixup(images, torch.full((B,), 0.7), label, 0.5, draws=_no_cut(B, partner))
    assert torch.equal(eq.lam, torch.full((B,), 0.5))


@pytest.mark.parametrize("B", [6, 80])
def test_pseudo_mixup_no_duplicate_images(B):
    # the defect of flip(0) pairing: with everyone on mixup, a pair (i, j = B-1-i) got one image twice
    g = _gen(B)
    images = torch.randn(B, 3, 8, 8, generator=g)
    prob = torch.randperm(B, generator=g).float() / (2 * B) + 0.5  # distinct confidences
    label = torch.arange(B)
    for seed in range(5):
        d = draw_mix_randomness(B, 8, 8, 0.0, "cpu", _gen(seed))  # cutmix_prob 0: all mixup
        assert not bool(d.use_cutmix.any())
        out = pseudo_mixup(images, prob, label, 0.5, draws=d).images.flatten(1)  # (B, C*H*W)
        dist = torch.cdist(out, out) + torch.eye(B) * 1e9
        assert float(dist.min()) > 1e-3, "two mixed images coincide"
    # the old pairing does produce duplicates: out_i == out_{B-1-i}
    flip = _no_cut(B, torch.arange(B - 1, -1, -1))
    old = pseudo_mixup(images, prob, label, 0.5, draws=flip).images
    torch.testing.assert_close(old, old.flip(0), rtol=0, atol=1e-5)


def test_pseudo_mixup_cutmix_box_from_partner():
    B, C, H, W = 6, 3, 7, 5
    # distinct constant images, so each pixel tells where it came from
    images = torch.arange(B, dtype=torch.float32)[:, None, None, None].expand(B, C, H, W).contiguous()
    prob = torch.tensor([0.9, 0.3, 0.5, 0.8, 0.6, 0.2])
    label = torch.arange(B)
    cy, cx = torch.tensor([3, 0, 6, 2, 1, 4]), torch.tensor([2, 4, 0, 1, 3, 2])
    partner = torch.tensor([3, 0, 5, 4, 2, 1])  # one 6-cycle: 0 -> 3 -> 4 -> 2 -> 5 -> 1 -> 0
    assert _is_single_cycle(partner)
    all_cut = MixDraws(torch.ones(B, dtype=torch.bool), cy, cx, partner)
    out = pseudo_mixup(images, prob, label, 0.5, draws=all_cut)
    ref = pseudo_mixup_reference(images, prob, label, 0.5, draws=all_cut)
    assert torch.equal(out.images, ref.images) and torch.equal(out.lam, ref.lam)
    for i in range(B):
        j = int(partner[i])
        img = out.images[i]
        assert bool(((img == i) | (img == j)).all())  # every pixel is own or partner's
        own = (img[0] == i).float().mean().item()
        assert out.lam[i].item() == pytest.approx(own, abs=1e-6)
        # the box matches the spec computed by hand for this sample
        lam = (prob[i] / (prob[i] + prob[j])).item()
        r = math.sqrt(1 - lam)
        ch, cw = int(H * r), int(W * r)
        cy, cx = int(all_cut.cy[i]), int(all_cut.cx[i])
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
        expect = torch.full((H, W), float(i))
        expect[y0:y1, x0:x1] = float(j)
        assert torch.equal(img[0], expect) and torch.equal(img[1], img[0])
    assert bool((out.lam < 1).any())  # at least one non-empty box in this setup
    assert torch.equal(out.label_b, partner)


def test_pseudo_mixup_mask_uses_merged_confidence():
    images, _, label = _mix_inputs()
    prob = torch.tensor([0.95, 0.2, 0.3, 0.4, 0.5, 0.1])
    # partner i -> i + 1 (mod 6): merged = 0.95, 0.3, 0.4, 0.5, 0.5, 0.95
    shift = _no_cut(6, torch.tensor([1, 2, 3, 4, 5, 0]))
    for fn in (pseudo_mixup, pseudo_mixup_reference):
        assert torch.equal(fn(images, prob, label, 0.5, draws=shift).mask, torch.tensor([1.0, 0, 0, 1, 1, 1]))
    out = pseudo_mixup(images, prob, label, 0.5, generator=_gen())
    partner = draw_mix_randomness(6, 7, 5, 0.5, "cpu", _gen()).partner  # the same draws
    assert torch.equal(out.mask, (torch.maximum(prob, prob[partner]) >= 0.5).float())


def test_pseudo_mixup_odd_batch_raises():
    images, prob, label = _mix_inputs(B=5)
    with pytest.raises(ValueError, match="unlabelled batch size must be even for pseudo mixup, got 5"):
        pseudo_mixup(images, prob, label, 0.5)
    with pytest.raises(ValueError, match="even"):
        pseudo_mixup_reference(images, prob, label, 0.5)


def test_pseudo_mixup_bad_draws_raise():
    images, prob, label = _mix_inputs(B=6)
    d = draw_mix_randomness(4, 7, 5, 0.5, "cpu", _gen())
    for fn in (pseudo_mixup, pseudo_mixup_reference):
        with pytest.raises(ValueError, match=r"draws.use_cutmix must be \(6,\)"):
            fn(images, prob, label, 0.5, draws=d)


def test_mix_batch_partner_index_equals_flip():
    images, prob, _ = _mix_inputs(B=6)
    B, _, H, W = images.shape
    d = draw_mix_randomness(B, H, W, 0.5, "cpu", _gen(5))
    lam = prob / (prob + prob.flip(0))
    a = mix_batch(images, lam, d.use_cutmix, d.cy, d.cx)
    b = mix_batch(images, lam, d.use_cutmix, d.cy, d.cx, partner_index=torch.arange(B - 1, -1, -1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_mix_batch_partner_index_is_a_gather():
    # mixing with partner_index equals relabelling: permute the batch, mix by flip, permute back
    images, prob, _ = _mix_inputs(B=6, H=9, W=11)
    B, _, H, W = images.shape
    d = draw_mix_randomness(B, H, W, 0.5, "cpu", _gen(6))
    for dtype in (torch.float32, torch.bfloat16):
        x = images.to(dtype)
        # a partner that is an involution, so it is flip(0) in some order: pairs (order[k], order[B-1-k])
        order = torch.randperm(B, generator=_gen(8))
        partner = torch.empty_like(order)
        partner[order] = order.flip(0)
        lam = prob / (prob + prob[partner])
        a_img, a_lam = mix_batch(x, lam, d.use_cutmix, d.cy, d.cx, partner_index=partner)
        b_img, b_lam = mix_batch(x[order], lam[order], d.use_cutmix[order], d.cy[order], d.cx[order])
        assert torch.equal(a_img[order], b_img) and torch.equal(a_lam[order], b_lam)


# ------------------------------------------------------------------------------ labelled mixup


def test_labelled_mixup_deterministic_and_in_range():
    images, _, labels = _mix_inputs(B=8, H=16, W=16)
    seen_cut = seen_mix = False
    for seed in range(20):
        a = labelled_mixup(images, labels, generator=_gen(seed))
        b = labelled_mixup(images, labels, generator=_gen(seed))
        assert torch.equal(a.images, b.images) and torch.equal(a.lam, b.lam)
        assert bool(((a.lam >= 0) & (a.lam <= 1)).all())
        assert torch.equal(a.lam, a.lam[:1].expand(8))  # one lam for the batch
        assert torch.equal(a.mask, torch.ones(8)) and torch.equal(a.label_b, labels.flip(0))
        lam = a.lam[0]
        mixed = lam * images + (1 - lam) * images.flip(0)
        if torch.allclose(a.images, mixed, atol=1e-5):
            seen_mix = True
        else:  # cutmix: every pixel is own or partner's
            seen_cut = True
            assert bool(((a.images == images) | (a.images == images.flip(0))).all())
    assert seen_cut and seen_mix
    assert not torch.equal(labelled_mixup(images, labels, generator=_gen(0)).lam,
                           labelled_mixup(images, labels, generator=_gen(1)).lam)


def test_labelled_mixup_single_modes_and_identity():
    images, _, labels = _mix_inputs(B=4, H=8, W=8)
    keep = images.clone()
    ident = labelled_mixup(images, labels, mixup_alpha=0.0, cutmix_alpha=0.0)
    assert torch.equal(ident.images, images) and torch.equal(ident.lam, torch.ones(4))
    assert torch.equal(ident.label_a, labels) and torch.equal(ident.label_b, labels)
    cut = labelled_mixup(images, labels, mixup_alpha=0.0, cutmix_alpha=1.0, generator=_gen(2))
    assert bool(((cut.images == images) | (cut.images == images.flip(0))).all())
    mix = labelled_mixup(images, labels, mixup_alpha=0.8, cutmix_alpha=0.0, generator=_gen(2))
    lam = mix.lam[0]
    torch.testing.assert_close(mix.images, lam * images + (1 - lam) * images.flip(0), rtol=0, atol=1e-6)
    assert torch.equal(images, keep)


# ------------------------------------------------------------------------------------ soft CE


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
def test_soft_ce_matches_reference(B, C, with_mask):
    g = _gen(B * C)
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
    if not _runs_float64(kernels_backend):
        return
    g = _gen(7)
    B, C = 4, 5
    logits = torch.randn(B, C, generator=g, dtype=torch.float64, requires_grad=True)
    la, lb = torch.randint(0, C, (B,), generator=g), torch.randint(0, C, (B,), generator=g)
    lam = torch.rand(B, generator=g, dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: _SoftTargetCE.apply(z, la, lb, lam, mask, 0.1), (logits,))
    out = soft_target_cross_entropy(logits, la, lb, lam, mask, 0.1)
    assert out.dtype == torch.float64


def test_soft_ce_masked_samples_count_as_zero():
    g = _gen(11)
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


def test_soft_ce_bf16_close_to_float32():
    g = _gen(12)
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


# -------------------------------------------------------------------------------- no host sync

_SYNCING = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
    torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__,
    torch.nonzero, torch.Tensor.nonzero, torch.masked_select, torch.Tensor.masked_select,
}


class _SyncSpy(TorchFunctionMode):
    """Records calls that read device values on the host (a sync on GPU) or make data-dependent shapes."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _SYNCING:
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_public_functions_do_not_sync():
    images, prob, label = _mix_inputs(B=8, H=9, W=11)
    logits = torch.randn(8, 10, requires_grad=True)
    t, s = ema_tensors(_net(1, torch.float32), False), ema_tensors(_net(2, torch.float32), False)
    spy = _SyncSpy()
    with spy:
        p, y, m = pseudo_label(logits, 0.5)
        mixed = pseudo_mixup(images, p, y, 0.5, generator=_gen())
        d = draw_mix_randomness(8, 9, 11, 0.5, "cpu", _gen(1))
        pseudo_mixup(images.bfloat16(), p, y, 0.5, draws=d)
        mix_batch(images, p, d.use_cutmix, d.cy, d.cx, partner_index=d.partner)
        labelled_mixup(images, label, generator=_gen())
        loss = soft_target_cross_entropy(logits, mixed.label_a, mixed.label_b, mixed.lam, mixed.mask)
        loss.backward()
        ema_update(t, s, 0.999)
    assert spy.calls == []
    with spy:  # the spy does see the reference's host reads
        pseudo_mixup_reference(images, prob, label, 0.5, generator=_gen())
    assert "item" in spy.calls


def test_pseudo_mixup_ignores_autocast():
    images, prob, label = _mix_inputs()
    d = draw_mix_randomness(6, 7, 5, 0.5, "cpu", _gen(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pseudo_mixup(images, prob, label, 0.5, draws=d)
    ref = pseudo_mixup_reference(images, prob, label, 0.5, draws=d)
    assert out.images.dtype == torch.float32
    torch.testing.assert_close(out.images, ref.images, rtol=0, atol=1e-6)
