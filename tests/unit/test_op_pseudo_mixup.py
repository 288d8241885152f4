"""Pseudo mixup, mix_batch and labelled mixup (kernels/pseudo_mixup.py): every implementation
against the reference, then behaviour of the public functions, the native ops and the Triton ops."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from conftest import impl_device
from kernel_cases import FLOATS, IMAGE_CASES, TOL, border_draws, gen, runs, runs_float64

from kernels import (
    KernelUnavailable,
    MixDraws,
    draw_mix_randomness,
    labelled_mixup,
    mix_batch,
    pseudo_mixup,
    pseudo_mixup_reference,
)
from kernels.pseudo_mixup import random_derangement


@pytest.mark.parametrize("case", IMAGE_CASES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS)
def test_pseudo_mixup_matches_the_reference_on_every_implementation(impl, case, dtype):
    B, C, H, W = case
    g = gen(B * H * W)
    images = torch.randn(B, C, H, W, generator=g).to(dtype)
    prob = torch.rand(B, generator=g)
    prob[0], prob[1] = 1e-6, 0.999  # lam near 0 (a box as large as the image) and near 1
    label = torch.arange(B)
    draws = border_draws(B, H, W, seed=B)
    ref = pseudo_mixup_reference(images, prob, label, 0.6, draws=draws)
    dev = impl_device(impl)
    on_dev = MixDraws(*(t.to(dev) for t in draws))
    if not runs(impl, dtype):
        with pytest.raises(KernelUnavailable, match="float64"):
            pseudo_mixup(images.to(dev), prob.to(dev), label.to(dev), 0.6, draws=on_dev, backend=impl)
        return
    out = pseudo_mixup(images.to(dev), prob.to(dev), label.to(dev), 0.6, draws=on_dev, backend=impl)
    cut = draws.use_cutmix
    assert out.images.dtype == dtype and out.lam.dtype == out.mask.dtype == torch.float32
    assert torch.equal(out.images.cpu()[cut], ref.images[cut])  # cutmix pixels are exact copies
    torch.testing.assert_close(out.images.cpu(), ref.images, **TOL[dtype])
    assert torch.equal(out.lam.cpu(), ref.lam) and torch.equal(out.mask.cpu(), ref.mask)
    assert torch.equal(out.label_b.cpu(), ref.label_b)


# ------------------------------------------------------------------------- public functions, per backend

def _mix_inputs(B=6, C=3, H=7, W=5, dtype=torch.float32, seed=0):
    g = gen(seed)
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
@pytest.mark.usefixtures("kernels_backend")
def test_partner_is_a_derangement(B):
    for seed in range(20):
        d = draw_mix_randomness(B, 7, 5, 0.5, "cpu", gen(seed))
        partner = d.partner
        assert partner.dtype == torch.int64 and partner.shape == (B,)
        assert torch.equal(partner.sort().values, torch.arange(B))  # a permutation
        assert not bool((partner == torch.arange(B)).any())  # no fixed points
        assert _is_single_cycle(partner)  # one B-cycle
        if B >= 3:  # hence no 2-cycles: nobody is their partner's partner
            assert not bool((partner[partner] == torch.arange(B)).any())
    assert torch.equal(draw_mix_randomness(2, 7, 5, 0.5, "cpu", gen()).partner, torch.tensor([1, 0]))
    if B > 2:  # random, not a fixed pairing
        assert len({tuple(draw_mix_randomness(B, 7, 5, 0.5, "cpu", gen(s)).partner.tolist()) for s in range(5)}) > 1


@pytest.mark.usefixtures("kernels_backend")
def test_random_derangement_covers_all_cycles():
    # B = 4: (4 - 1)! = 6 four-cycles, each with probability 1/6
    seen = {}
    g = gen(1)
    for _ in range(600):
        key = tuple(random_derangement(4, "cpu", g).tolist())
        seen[key] = seen.get(key, 0) + 1
    assert len(seen) == 6 and all(_is_single_cycle(torch.tensor(k)) for k in seen)
    assert min(seen.values()) > 60  # expected 100 each


@pytest.mark.usefixtures("kernels_backend")
def test_draw_order_partner_last():
    # use_cutmix, cy, cx come first, from the same stream as before the partner existed
    B, H, W = 8, 9, 11
    d = draw_mix_randomness(B, H, W, 0.5, "cpu", gen(7))
    g = gen(7)
    assert torch.equal(d.use_cutmix, torch.rand(B, generator=g) < 0.5)
    assert torch.equal(d.cy, torch.randint(0, H, (B,), generator=g))
    assert torch.equal(d.cx, torch.randint(0, W, (B,), generator=g))
    assert torch.equal(d.partner, random_derangement(B, "cpu", g))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [6, 80])
@pytest.mark.usefixtures("kernels_backend")
def test_pseudo_mixup_matches_reference(seed, dtype, B):
    images, prob, label = _mix_inputs(B=B, dtype=dtype, seed=seed)
    _, _, H, W = images.shape
    draws = draw_mix_randomness(B, H, W, 0.5, "cpu", gen(100 + seed))
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
    draws = draw_mix_randomness(B, 9, 11, 0.5, "cpu", gen(7))
    kept = pseudo_mixup(images, prob, label, 0.6, draws=draws)
    donated = images.clone()
    got = pseudo_mixup(donated, prob, label, 0.6, draws=draws, donate=True)
    assert torch.equal(got.images, kept.images) and torch.equal(got.lam, kept.lam) and torch.equal(got.mask, kept.mask)
    assert (got.images is donated) == (kernels_backend == "native")
    for seed in range(4):  # labelled mixup (flip(0) pairs: 2-cycles), mixup and cutmix draws
        kept = labelled_mixup(images, label, generator=gen(seed))
        got = labelled_mixup(images.clone(), label, generator=gen(seed), donate=True)
        assert torch.equal(got.images, kept.images) and torch.equal(got.lam, kept.lam)


def test_pseudo_mixup_float64_keeps_precision(kernels_backend):
    if not runs_float64(kernels_backend):
        return
    images, prob, label = _mix_inputs(dtype=torch.float64)
    d = draw_mix_randomness(6, 7, 5, 0.5, "cpu", gen(9))
    out = pseudo_mixup(images, prob, label, 0.5, draws=d)
    ref = pseudo_mixup_reference(images, prob, label, 0.5, draws=d)
    assert out.images.dtype == torch.float64
    torch.testing.assert_close(out.images, ref.images, rtol=0, atol=1e-12)


@pytest.mark.usefixtures("kernels_backend")
def test_pseudo_mixup_same_generator_same_result():
    images, prob, label = _mix_inputs(B=8, H=9, W=11)
    a = pseudo_mixup(images, prob, label, 0.5, generator=gen(3))
    b = pseudo_mixup_reference(images, prob, label, 0.5, generator=gen(3))
    c = pseudo_mixup(images, prob, label, 0.5, draws=draw_mix_randomness(8, 9, 11, 0.5, "cpu", gen(3)))
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-6)
    assert torch.equal(a.lam, b.lam) and torch.equal(a.label_b, b.label_b) and torch.equal(a.mask, b.mask)
    assert torch.equal(a.images, c.images) and torch.equal(a.label_b, c.label_b)


def _no_cut(B: int, partner: torch.Tensor) -> MixDraws:
    zeros = torch.zeros(B, dtype=torch.long)
    return MixDraws(torch.zeros(B, dtype=torch.bool), zeros, zeros, partner)


@pytest.mark.usefixtures("kernels_backend")
def test_pseudo_mixup_mixup_pairs():
    images, prob, label = _mix_inputs()
    B = images.shape[0]
    partner = random_derangement(B, "cpu", gen(2))
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
@pytest.mark.usefixtures("kernels_backend")
def test_pseudo_mixup_no_duplicate_images(B):
    # the defect of flip(0) pairing: with everyone on mixup, a pair (i, j = B-1-i) got one image twice
    g = gen(B)
    images = torch.randn(B, 3, 8, 8, generator=g)
    prob = torch.randperm(B, generator=g).float() / (2 * B) + 0.5  # distinct confidences
    label = torch.arange(B)
    for seed in range(5):
        d = draw_mix_randomness(B, 8, 8, 0.0, "cpu", gen(seed))  # cutmix_prob 0: all mixup
        assert not bool(d.use_cutmix.any())
        out = pseudo_mixup(images, prob, label, 0.5, draws=d).images.flatten(1)  # (B, C*H*W)
        dist = torch.cdist(out, out) + torch.eye(B) * 1e9
        assert float(dist.min()) > 1e-3, "two mixed images coincide"
    # the old pairing does produce duplicates: out_i == out_{B-1-i}
    flip = _no_cut(B, torch.arange(B - 1, -1, -1))
    old = pseudo_mixup(images, prob, label, 0.5, draws=flip).images
    torch.testing.assert_close(old, old.flip(0), rtol=0, atol=1e-5)


@pytest.mark.usefixtures("kernels_backend")
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


@pytest.mark.usefixtures("kernels_backend")
def test_pseudo_mixup_mask_uses_merged_confidence():
    images, _, label = _mix_inputs()
    prob = torch.tensor([0.95, 0.2, 0.3, 0.4, 0.5, 0.1])
    # partner i -> i + 1 (mod 6): merged = 0.95, 0.3, 0.4, 0.5, 0.5, 0.95
    shift = _no_cut(6, torch.tensor([1, 2, 3, 4, 5, 0]))
    for fn in (pseudo_mixup, pseudo_mixup_reference):
        assert torch.equal(fn(images, prob, label, 0.5, draws=shift).mask, torch.tensor([1.0, 0, 0, 1, 1, 1]))
    out = pseudo_mixup(images, prob, label, 0.5, generator=gen())
    partner = draw_mix_randomness(6, 7, 5, 0.5, "cpu", gen()).partner  # the same draws
    assert torch.equal(out.mask, (torch.maximum(prob, prob[partner]) >= 0.5).float())


@pytest.mark.usefixtures("kernels_backend")
def test_pseudo_mixup_odd_batch_raises():
    images, prob, label = _mix_inputs(B=5)
    with pytest.raises(ValueError, match="unlabelled batch size must be even for pseudo mixup, got 5"):
        pseudo_mixup(images, prob, label, 0.5)
    with pytest.raises(ValueError, match="even"):
        pseudo_mixup_reference(images, prob, label, 0.5)


@pytest.mark.usefixtures("kernels_backend")
def test_pseudo_mixup_bad_draws_raise():
    images, prob, label = _mix_inputs(B=6)
    d = draw_mix_randomness(4, 7, 5, 0.5, "cpu", gen())
    for fn in (pseudo_mixup, pseudo_mixup_reference):
        with pytest.raises(ValueError, match=r"draws.use_cutmix must be \(6,\)"):
            fn(images, prob, label, 0.5, draws=d)


@pytest.mark.usefixtures("kernels_backend")
def test_mix_batch_partner_index_equals_flip():
    images, prob, _ = _mix_inputs(B=6)
    B, _, H, W = images.shape
    d = draw_mix_randomness(B, H, W, 0.5, "cpu", gen(5))
    lam = prob / (prob + prob.flip(0))
    a = mix_batch(images, lam, d.use_cutmix, d.cy, d.cx)
    b = mix_batch(images, lam, d.use_cutmix, d.cy, d.cx, partner_index=torch.arange(B - 1, -1, -1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.usefixtures("kernels_backend")
def test_mix_batch_partner_index_is_a_gather():
    # mixing with partner_index equals relabelling: permute the batch, mix by flip, permute back
    images, prob, _ = _mix_inputs(B=6, H=9, W=11)
    B, _, H, W = images.shape
    d = draw_mix_randomness(B, H, W, 0.5, "cpu", gen(6))
    for dtype in (torch.float32, torch.bfloat16):
        x = images.to(dtype)
        # a partner that is an involution, so it is flip(0) in some order: pairs (order[k], order[B-1-k])
        order = torch.randperm(B, generator=gen(8))
        partner = torch.empty_like(order)
        partner[order] = order.flip(0)
        lam = prob / (prob + prob[partner])
        a_img, a_lam = mix_batch(x, lam, d.use_cutmix, d.cy, d.cx, partner_index=partner)
        b_img, b_lam = mix_batch(x[order], lam[order], d.use_cutmix[order], d.cy[order], d.cx[order])
        assert torch.equal(a_img[order], b_img) and torch.equal(a_lam[order], b_lam)


# ------------------------------------------------------------------------------ labelled mixup


@pytest.mark.usefixtures("kernels_backend")
def test_labelled_mixup_deterministic_and_in_range():
    images, _, labels = _mix_inputs(B=8, H=16, W=16)
    seen_cut = seen_mix = False
    for seed in range(20):
        a = labelled_mixup(images, labels, generator=gen(seed))
        b = labelled_mixup(images, labels, generator=gen(seed))
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
    assert not torch.equal(labelled_mixup(images, labels, generator=gen(0)).lam,
                           labelled_mixup(images, labels, generator=gen(1)).lam)


@pytest.mark.usefixtures("kernels_backend")
def test_labelled_mixup_single_modes_and_identity():
    images, _, labels = _mix_inputs(B=4, H=8, W=8)
    keep = images.clone()
    ident = labelled_mixup(images, labels, mixup_alpha=0.0, cutmix_alpha=0.0)
    assert torch.equal(ident.images, images) and torch.equal(ident.lam, torch.ones(4))
    assert torch.equal(ident.label_a, labels) and torch.equal(ident.label_b, labels)
    cut = labelled_mixup(images, labels, mixup_alpha=0.0, cutmix_alpha=1.0, generator=gen(2))
    assert bool(((cut.images == images) | (cut.images == images.flip(0))).all())
    mix = labelled_mixup(images, labels, mixup_alpha=0.8, cutmix_alpha=0.0, generator=gen(2))
    lam = mix.lam[0]
    torch.testing.assert_close(mix.images, lam * images + (1 - lam) * images.flip(0), rtol=0, atol=1e-6)
    assert torch.equal(images, keep)


# ------------------------------------------------------------------------------------ native ops

def _check_native_mixed(out, ref, use_cutmix, dtype):
    cut = use_cutmix.nonzero().flatten()
    assert torch.equal(out[cut], ref[cut])  # cutmix pixels: plain copies, exactly
    rtol, atol = TOL[dtype]["rtol"], TOL[dtype]["atol"]
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(("B", "C", "H", "W"), [(2, 1, 13, 17), (8, 3, 31, 29), (6, 2, 1, 5)])
def test_native_pseudo_mixup(native_ops, dtype, B, C, H, W):
    g = gen(B * H * W)
    images = torch.randn(B, C, H, W, generator=g).to(dtype)
    prob = torch.rand(B, generator=g)
    prob[0] = 1e-6  # lam near 0 for sample 0 (box as large as the image), near 1 for its partner
    prob[1] = 0.999
    label = torch.arange(B)
    draws = border_draws(B, H, W, seed=B)
    before = images.clone()
    out, lam, mask = native_ops.pseudo_mixup(images, prob, *draws, 0.6)
    ref = pseudo_mixup_reference(images, prob, label, 0.6, draws=draws)
    assert torch.equal(images, before)  # the input is never modified
    assert out.dtype == dtype and out.shape == images.shape
    assert torch.equal(lam, ref.lam) and torch.equal(mask, ref.mask)
    _check_native_mixed(out, ref.images, draws.use_cutmix, dtype)


def test_native_pseudo_mixup_zero_confidences(native_ops):
    """p_i = p_j = 0: lam = 0.5 (no NaN), for mixup and cutmix samples."""
    B, H, W = 4, 13, 17
    images = torch.randn(B, 3, H, W, generator=gen(3))
    prob = torch.zeros(B)
    draws = border_draws(B, H, W, seed=4)
    out, lam, mask = native_ops.pseudo_mixup(images, prob, *draws, 0.5)
    ref = pseudo_mixup_reference(images, prob, torch.arange(B), 0.5, draws=draws)
    assert torch.isfinite(out).all() and torch.isfinite(lam).all()
    assert torch.equal(lam[~draws.use_cutmix], torch.full(((~draws.use_cutmix).sum(),), 0.5))
    assert torch.equal(lam, ref.lam) and torch.equal(mask, ref.mask) and not mask.any()
    _check_native_mixed(out, ref.images, draws.use_cutmix, torch.float32)


def _torch_mix_batch(*args):
    """kernels.pseudo_mixup.mix_batch on its torch path (the vectorised core the native op replaces)."""
    kw = {"backend": "torch"} if "backend" in inspect.signature(mix_batch).parameters else {}
    return mix_batch(*args, **kw)


@pytest.mark.parametrize("dtype", FLOATS)
def test_native_mix_batch(native_ops, dtype):
    B, C, H, W = 8, 3, 31, 29
    g = gen(5)
    images = torch.randn(B, C, H, W, generator=g).to(dtype)
    # lam below 0 makes boxes larger than the image (clipped on every side); near 0 and 1; plain values
    lam = torch.tensor([-10.0, 1e-7, 1.0 - 1e-7, 1.0, 0.0, 0.3, 0.77, 0.5])
    use_cutmix = torch.tensor([True, True, True, True, True, False, False, True])
    cy = torch.tensor([0, H - 1, 5, 0, H - 1, 3, 4, 15])
    cx = torch.tensor([W - 1, 0, 0, 7, W - 1, 2, 1, 14])
    partner = random_derangement(B, "cpu", g)
    out, lam_out = native_ops.mix_batch(images, lam, use_cutmix, cy, cx, partner)
    ref, ref_lam = _torch_mix_batch(images, lam, use_cutmix, cy, cx, partner)
    assert torch.equal(lam_out, ref_lam)
    assert lam_out[0].item() == 0.0  # the whole image came from the partner
    _check_native_mixed(out, ref, use_cutmix, dtype)
    # timm "batch" mode: one lam, partner flip(0)
    flip = torch.arange(B - 1, -1, -1)
    for cut in (True, False):
        args = (lam[5].expand(B), torch.tensor(cut).expand(B), cy[7].expand(B), cx[7].expand(B))
        out, lam_out = native_ops.mix_batch(images, *(a.contiguous() for a in args), flip)
        ref, ref_lam = _torch_mix_batch(images, *args)
        assert torch.equal(lam_out, ref_lam)
        _check_native_mixed(out, ref, args[1], dtype)



def test_native_mix_errors(native_ops):
    B, H, W = 2, 5, 6
    images = torch.zeros(B, 1, H, W)
    ok = (torch.full((B,), 0.5), torch.ones(B, dtype=torch.bool), torch.zeros(B, dtype=torch.long),
          torch.zeros(B, dtype=torch.long), torch.tensor([1, 0]))
    native_ops.mix_batch(images, *ok)
    with pytest.raises(RuntimeError, match="cy\\[1\\] = 5"):
        native_ops.mix_batch(images, ok[0], ok[1], torch.tensor([0, H]), ok[3], ok[4])
    with pytest.raises(RuntimeError, match="partner"):
        native_ops.mix_batch(images, *ok[:4], torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match="use_cutmix must be Bool"):
        native_ops.mix_batch(images, ok[0], ok[1].long(), *ok[2:])
    with pytest.raises(RuntimeError, match="\\(B, C, H, W\\)"):
        native_ops.mix_batch(images[0], *ok)
    with pytest.raises(RuntimeError, match="prob must have shape"):
        native_ops.pseudo_mixup(images, torch.zeros(3), *ok[1:], 0.5)


# ------------------------------------------------------------------------------------ Triton ops

DEV = impl_device("triton")
B, CH, H, W = 6, 3, 13, 17  # H x W not multiples of any block


def _triton_draws():
    """Boxes touching / clipped at every border, one covering everything, mixup samples too."""
    use_cutmix = torch.tensor([True, True, True, True, False, False])
    cy = torch.tensor([0, H - 1, 6, 1, 0, 5])
    cx = torch.tensor([0, W - 1, 8, W - 2, 0, 3])
    partner = torch.tensor([3, 2, 5, 4, 1, 0])  # a single 6-cycle
    return use_cutmix, cy, cx, partner


def _check_triton_mixup(out, lam, mask, ref, use_cutmix, dtype):
    assert out.dtype == dtype and lam.dtype == torch.float32 and mask.dtype == torch.float32
    cut = use_cutmix
    assert torch.equal(out.cpu()[cut], ref.images[cut])  # cutmix pixels are exact copies
    torch.testing.assert_close(out.cpu(), ref.images, **TOL[dtype])
    torch.testing.assert_close(lam.cpu(), ref.lam, atol=0, rtol=0)
    assert torch.equal(mask.cpu(), ref.mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_triton_pseudo_mixup_matches_reference(triton_ns, dtype):
    g = torch.Generator().manual_seed(2)
    images = torch.randn(B, CH, H, W, generator=g).to(dtype)
    # lam near 0: sample 0 (cutmix, a full-size box clipped at the corner) and 4 (mixup); near 1: sample 3
    # (cutmix, empty box) and 5 (mixup); moderate: 1 (clipped at the bottom-right corner) and 2 (inside)
    prob = torch.tensor([1e-6, 0.5, 0.6, 0.999, 1e-6, 0.45])
    use_cutmix, cy, cx, partner = _triton_draws()
    before = images.clone()
    out, lam, mask = triton_ns.pseudo_mixup(images.to(DEV), prob.to(DEV), use_cutmix.to(DEV), cy.to(DEV), cx.to(DEV),
                                      partner.to(DEV), 0.7)
    ref = pseudo_mixup_reference(images, prob, torch.arange(B), 0.7, draws=MixDraws(use_cutmix, cy, cx, partner))
    _check_triton_mixup(out, lam, mask, ref, use_cutmix, dtype)
    assert torch.equal(images, before)  # input untouched
    assert lam[3] == 1.0 and lam[4] < 1e-5 and lam[5] > 0.9999 and (lam[:3] < 0.9).all()


def test_triton_pseudo_mixup_zero_confidence_gives_half(triton_ns):
    g = torch.Generator().manual_seed(3)
    images = torch.randn(B, CH, H, W, generator=g)
    prob = torch.tensor([0.0, 0.0, 0.8, 0.0, 0.0, 0.0])  # p_i + p_j = 0 for samples 0, 3, 4 (and not 1, 2, 5)
    use_cutmix, cy, cx, partner = _triton_draws()
    out, lam, mask = triton_ns.pseudo_mixup(images.to(DEV), prob.to(DEV), use_cutmix.to(DEV), cy.to(DEV), cx.to(DEV),
                                      partner.to(DEV), 0.5)
    assert not torch.isnan(out).any() and not torch.isnan(lam).any()
    p_j = prob[partner]
    lam_in = torch.where(prob + p_j == 0, 0.5, prob / (prob + p_j).clamp_min(1e-30))
    assert lam_in[4] == 0.5 and lam_in[0] == 0.5
    exp_out, exp_lam = mix_batch(images, lam_in, use_cutmix, cy, cx, partner)  # the torch path
    assert torch.equal(out.cpu()[use_cutmix], exp_out[use_cutmix])
    torch.testing.assert_close(out.cpu(), exp_out, **TOL[torch.float32])
    torch.testing.assert_close(lam.cpu(), exp_lam, atol=0, rtol=0)
    assert lam[4] == 0.5  # a mixup sample with p_i = p_j = 0
    torch.testing.assert_close(mask.cpu(), (torch.maximum(prob, p_j) >= 0.5).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_mix_batch_matches_torch_path(triton_ns, dtype):
    g = torch.Generator().manual_seed(4)
    images = torch.randn(B, CH, H, W, generator=g).to(dtype)
    lam = torch.tensor([0.0, 1.0, 0.0, 0.999, 0.0, 1.0])  # lam 0 / 1 for cutmix and mixup samples
    use_cutmix, cy, cx, partner = _triton_draws()
    out, lam_out = triton_ns.mix_batch(images.to(DEV), lam.to(DEV), use_cutmix.to(DEV), cy.to(DEV), cx.to(DEV),
                                 partner.to(DEV))
    exp_out, exp_lam = mix_batch(images, lam, use_cutmix, cy, cx, partner)
    assert torch.equal(out.cpu()[use_cutmix], exp_out[use_cutmix])
    torch.testing.assert_close(out.cpu(), exp_out, **TOL[dtype])
    torch.testing.assert_close(lam_out.cpu(), exp_lam, atol=0, rtol=0)
    # lam 0 centred: box [0, 12) x [0, 16) touching the top and left borders (odd H, W: // 2 leaves a row / column)
    assert lam_out[2].item() == torch.tensor(1.0 - 12 * 16 / (H * W)).float().item()
    assert lam_out[1] == 1.0 and lam_out[3] == 1.0  # empty boxes
    assert torch.equal(out[4].cpu(), images[partner[4]]) and torch.equal(out[5].cpu(), images[5])  # mixup lam 0 / 1


def test_triton_mix_tiles_over_rows_and_columns(triton_ns, monkeypatch):
    """Tiles smaller than a row (several column tiles, several row tiles): same result, bit for bit."""
    from kernels.triton_ops import pseudo_mixup as triton_mix

    g = torch.Generator().manual_seed(5)
    images = torch.randn(B, CH, H, W, generator=g).to(DEV)
    prob = torch.rand(B, generator=g).to(DEV)
    draws = [t.to(DEV) for t in _triton_draws()]
    expected = triton_ns.pseudo_mixup(images, prob, *draws, 0.5)
    monkeypatch.setitem(triton_mix.CONFIG, "block", 32)
    monkeypatch.setitem(triton_mix.CONFIG, "max_block_w", 8)  # 3 column tiles of 8 for W = 17, 4 rows a tile
    got = triton_ns.pseudo_mixup(images, prob, *draws, 0.5)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_triton_pseudo_mixup_box_arithmetic_against_python(triton_ns):
    """Every cy, cx of a small image with a lam whose box is clipped: lam_out is the spec's float64 area."""
    h, w, n = 5, 7, 35
    images = torch.randn(n, 1, h, w)
    lam_in = torch.full((n,), 0.36)  # r = 0.8: cut 4 x 5, half 2 x 2
    cy = torch.arange(n) // w
    cx = torch.arange(n) % w
    partner = torch.arange(n).roll(1)
    out, lam = triton_ns.mix_batch(images.to(DEV), lam_in.to(DEV), torch.ones(n, dtype=torch.bool, device=DEV),
                             cy.to(DEV), cx.to(DEV), partner.to(DEV))
    r = math.sqrt(max(1.0 - float(lam_in[0]), 0.0))
    for i in range(n):
        y0, y1 = min(max(int(cy[i]) - int(h * r) // 2, 0), h), min(max(int(cy[i]) + int(h * r) // 2, 0), h)
        x0, x1 = min(max(int(cx[i]) - int(w * r) // 2, 0), w), min(max(int(cx[i]) + int(w * r) // 2, 0), w)
        assert lam[i].item() == pytest.approx(1.0 - (y1 - y0) * (x1 - x0) / (h * w), abs=1e-7)
        expected = images[i].clone()
        expected[:, y0:y1, x0:x1] = images[int(partner[i])][:, y0:y1, x0:x1]
        assert torch.equal(out[i].cpu(), expected)


