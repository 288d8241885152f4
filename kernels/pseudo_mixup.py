"""Probabilistic pseudo mixup (docs/method.md, step 3; docs/kernels.md) and timm-style labelled mixup / cutmix.

Unlabelled data: sample i is paired with j = partner[i], where ``partner`` (B,) is a random
permutation drawn with the other random draws (``MixDraws.partner``, drawn LAST, after use_cutmix,
cy and cx, so those keep their streams). lam_i = p_i / (p_i + p_j) (0.5 when both are 0). Per sample, with probability
``cutmix_prob``, cutmix (a box of side ratio sqrt(1 - lam_i) taken from the partner, lam_i corrected
to the fraction of own pixels) else mixup (x_i <- lam_i x_i + (1 - lam_i) x_j). The merged confidence
max(p_i, p_j) is thresholded again for the mask; label_b = label[partner].

The partner is a random derangement made of a single B-cycle: perm = randperm(B),
partner[perm[k]] = perm[k - 1] (``perm.roll(1)`` scattered by ``perm``), uniform over the B-cycles.
 - no fixed points (B >= 2): a sample mixed with itself is a no-op that wastes it;
 - no 2-cycles (B >= 3): a pair (i, j) with partner[i] = j and partner[j] = i, with both drawing
   mixup, gets the same image twice (lam_j = 1 - lam_i) with the same soft target, which is why a
   fixed ``flip(0)`` pairing (an involution) wasted half of such pairs. (B = 2 has only the swap.)
The original Semi-ViT paired by a plain random permutation (fixed points and 2-cycles allowed).
Drawing and applying the partner is vectorised: a randperm, a scatter and gathers, no host sync.

The labelled batch keeps timm's "batch" mode: one lam for the batch and partner ``flip(0)``.

The draws are made in torch on the images' device by every backend, so the same seed gives the same
mixed batch whichever kernel mixes it.

Public API: ``pseudo_mixup`` (dispatch: Triton / native / torch, see ``kernels.dispatch``),
``pseudo_mixup_reference`` (the spec, a loop over samples), ``draw_mix_randomness`` (the random draws both
take), ``mix_batch`` (the shared vectorised core), ``labelled_mixup`` (timm "batch" mode), ``MixedBatch`` and
``MixDraws`` (results).
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
from torch import Tensor

from kernels import dispatch

__all__ = [
    "MixDraws",
    "MixedBatch",
    "draw_mix_randomness",
    "labelled_mixup",
    "mix_batch",
    "pseudo_mixup",
    "pseudo_mixup_reference",
    "random_derangement",
]


class MixedBatch(NamedTuple):
    images: Tensor  # (B, C, H, W), the input dtype
    label_a: Tensor  # (B,) int64, own label
    label_b: Tensor  # (B,) int64, partner's label
    lam: Tensor  # (B,) float32, weight of label_a in the soft target
    mask: Tensor  # (B,) float32, 1 where the sample counts in the loss


class MixDraws(NamedTuple):
    use_cutmix: Tensor  # (B,) bool
    cy: Tensor  # (B,) int64 in [0, H)
    cx: Tensor  # (B,) int64 in [0, W)
    partner: Tensor  # (B,) int64, a permutation: sample i mixes with sample partner[i]


def random_derangement(
    B: int, device: torch.device | str, generator: torch.Generator | None = None
) -> Tensor:
    """A random single B-cycle as an index tensor (B,) int64 on ``device``: no fixed points for
    B >= 2, no 2-cycles for B >= 3, uniform over the (B - 1)! cycles. One ``randperm`` and one
    scatter: partner[perm[k]] = perm[k - 1]. No host sync."""
    perm = torch.randperm(B, device=device, generator=generator)  # (B,)
    return torch.empty_like(perm).scatter_(0, perm, perm.roll(1))  # (B,)


def draw_mix_randomness(
    B: int,
    H: int,
    W: int,
    cutmix_prob: float,
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> MixDraws:
    """All random draws of a pseudo mixup, on ``device`` (``generator`` must live there too).

    Order: use_cutmix, cy, cx, then the partner permutation LAST (``random_derangement``)."""
    use_cutmix = torch.rand(B, device=device, generator=generator) < cutmix_prob  # (B,)
    cy = torch.randint(0, H, (B,), device=device, generator=generator)  # (B,)
    cx = torch.randint(0, W, (B,), device=device, generator=generator)  # (B,)
    partner = random_derangement(B, device, generator)  # (B,)
    return MixDraws(use_cutmix, cy, cx, partner)


def _check_pseudo(images: Tensor, prob: Tensor, label: Tensor) -> None:
    # the engine's config contract (semi.mu) keeps the unlabelled batch even; kept as a check here
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    B = images.shape[0]
    if B % 2:
        raise ValueError(f"unlabelled batch size must be even for pseudo mixup, got {B}")
    if prob.shape != (B,) or label.shape != (B,):
        raise ValueError(
            f"prob and label must be ({B},), got {tuple(prob.shape)} and {tuple(label.shape)}"
        )


def _check_draws(draws: MixDraws, B: int) -> None:
    """Shapes only (host metadata, no sync); that ``partner`` is a permutation is the caller's word."""
    for name, t in zip(MixDraws._fields, draws):
        if t.shape != (B,):
            raise ValueError(f"draws.{name} must be ({B},), got {tuple(t.shape)}")


# --------------------------------------------------------------------------------------- reference


@torch.no_grad()
def pseudo_mixup_reference(
    images: Tensor,
    prob: Tensor,
    label: Tensor,
    threshold: float,
    cutmix_prob: float = 0.5,
    generator: torch.Generator | None = None,
    draws: MixDraws | None = None,
) -> MixedBatch:
    """The spec, written plainly: one sample at a time, box arithmetic on Python numbers.

    Slow and syncing (host reads of lam and the draws, the partner included); it exists to test
    ``pseudo_mixup`` against. Sample i mixes with j = draws.partner[i].
    Mixing is computed in float32 (float64 for float64 images) and cast back to the image dtype.
    """
    _check_pseudo(images, prob, label)
    B, _, H, W = images.shape
    if draws is None:
        draws = draw_mix_randomness(B, H, W, cutmix_prob, images.device, generator)
    _check_draws(draws, B)
    p = prob.float()
    compute = torch.promote_types(images.dtype, torch.float32)  # bf16 / fp16 mix in float32
    out = images.clone()
    lam_out = torch.empty(B, dtype=torch.float32, device=images.device)
    label_b = torch.empty_like(label)
    merged = torch.empty(B, dtype=torch.float32, device=images.device)  # max(p_i, p_j)
    for i in range(B):
        j = int(draws.partner[i])
        label_b[i], merged[i] = label[j], torch.maximum(p[i], p[j])
        total = p[i] + p[j]
        lam = (p[i] / total).item() if total > 0 else 0.5  # float32 value, exactly; 0.5 for two zeros
        xi, xj = images[i].to(compute), images[j].to(compute)  # (C, H, W)
        if bool(draws.use_cutmix[i]):
            r = math.sqrt(1.0 - lam)
            cut_h, cut_w = int(H * r), int(W * r)
            cy, cx = int(draws.cy[i]), int(draws.cx[i])
            y0, y1 = min(max(cy - cut_h // 2, 0), H), min(max(cy + cut_h // 2, 0), H)
            x0, x1 = min(max(cx - cut_w // 2, 0), W), min(max(cx + cut_w // 2, 0), W)
            mixed = xi.clone()
            mixed[:, y0:y1, x0:x1] = xj[:, y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)
        else:
            mixed = xi * lam + xj * (1.0 - lam)
        out[i] = mixed.to(images.dtype)
        lam_out[i] = lam
    return MixedBatch(out, label, label_b, lam_out, (merged >= threshold).float())


# ------------------------------------------------------------------------------- vectorised core


def mix_batch(
    images: Tensor,
    lam: Tensor,
    use_cutmix: Tensor,
    cy: Tensor,
    cx: Tensor,
    partner_index: Tensor | None = None,
    backend: str | None = None,
    donate: bool = False,
) -> tuple[Tensor, Tensor]:
    """Mix every sample with its partner, vectorised: no loop, no host sync; the input is untouched
    unless ``donate`` (see ``pseudo_mixup``).

    images (B, C, H, W); lam, use_cutmix, cy, cx (B,); partner_index (B,) int64 or None for flip(0).
    Mixup samples: out = lam x + (1 - lam) x_partner. Cutmix samples: a box of side ratio
    sqrt(1 - lam) centred at (cy, cx), clipped to the image, comes from the partner.
    Returns (mixed images (B, C, H, W) in the input dtype, corrected lam (B,) float32).
    ``backend``: see ``kernels.dispatch``; the torch version is below, the fused ones make one pass.
    """
    B, _, H, W = images.shape
    dev = images.device
    impl = dispatch.resolve(backend, dev, images.dtype)
    if impl in ("triton", "native"):
        if partner_index is None:
            partner_index = torch.arange(B - 1, -1, -1, device=dev)  # flip(0)
        args = (lam.float().expand(B).contiguous(), use_cutmix.expand(B).contiguous(), cy.expand(B).contiguous(),
                cx.expand(B).contiguous(), partner_index.contiguous())
        if _mix_in_place(donate, impl, images):
            return images, dispatch.op(impl, "mix_batch_")(images, *args)
        return dispatch.op(impl, "mix_batch")(images.contiguous(), *args)
    lam = lam.float()  # (B,)
    # box bounds, in float64 like the reference's Python arithmetic (B numbers: negligible)
    r = (1.0 - lam.double()).clamp_min(0.0).sqrt()  # (B,) cut ratio
    half_h, half_w = (H * r).long() // 2, (W * r).long() // 2  # (B,)
    y0, y1 = (cy - half_h).clamp(0, H), (cy + half_h).clamp(0, H)  # (B,)
    x0, x1 = (cx - half_w).clamp(0, W), (cx + half_w).clamp(0, W)  # (B,)
    area = ((y1 - y0) * (x1 - x0)).double()  # (B,)
    lam_box = (1.0 - area / (H * W)).float()  # (B,) fraction of own pixels
    rows = torch.arange(H, device=dev)
    cols = torch.arange(W, device=dev)
    in_rows = (rows >= y0[:, None]) & (rows < y1[:, None]) & use_cutmix[:, None]  # (B, H), none for mixup
    in_cols = (cols >= x0[:, None]) & (cols < x1[:, None])  # (B, W)
    own = torch.where(use_cutmix, 1.0, lam)  # (B,) weight of the own image outside any box
    # w = own - in_rows (outer) in_cols, one batched outer product: 0 inside a cutmix box, 1 elsewhere
    # for cutmix samples, lam everywhere for mixup samples (all exact: the products are 0 or 1)
    no_autocast = contextlib.nullcontext() if dev.type == "meta" else torch.autocast(dev.type, enabled=False)
    with no_autocast:  # autocast would round lam to bf16 in baddbmm
        w = torch.baddbmm(
            own[:, None, None].expand(B, H, W), in_rows.float()[:, :, None], in_cols.float()[:, None, :], alpha=-1
        ).unsqueeze(1)  # (B, 1, H, W) float32
    # out starts as the partner (one copy: flip(0) or a gather, equally fast), then lerps toward the
    # own image in place; torch.lerp is exact at w = 0 and w = 1, so cutmix pixels are plain copies.
    # The gather is advanced indexing, not index_select: on CPU (torch 2.x, 2 threads) index_select
    # of (80, 3, 224, 224) float32 rows took ~15x longer than flip; images[idx] is as fast as flip.
    out = images.flip(0) if partner_index is None else images[partner_index]  # (B, C, H, W)
    if images.dtype in (torch.bfloat16, torch.float16):  # mix in float32, round once
        out = out.float().lerp_(images.float(), w).to(images.dtype)
    else:
        out.lerp_(images, w.to(images.dtype))
    return out, torch.where(use_cutmix, lam_box, lam)


def _mix_in_place(donate: bool, impl: str, images: Tensor) -> bool:
    """Whether a donated batch is mixed over itself: the native CPU ops do (no new tensor to allocate
    and page-fault, each image read once and written once); Triton and torch allocate their output,
    since on a GPU the caching allocator hands the same block back every step anyway."""
    return donate and impl == "native" and images.is_contiguous()


# -------------------------------------------------------------------------------------- public


@torch.no_grad()
def pseudo_mixup(
    images: Tensor,
    prob: Tensor,
    label: Tensor,
    threshold: float,
    cutmix_prob: float = 0.5,
    generator: torch.Generator | None = None,
    draws: MixDraws | None = None,
    backend: str | None = None,
    donate: bool = False,
) -> MixedBatch:
    """Probabilistic pseudo mixup of the strong views. images (B, C, H, W) float32 or bf16,
    prob (B,) teacher max probability, label (B,) teacher argmax; B must be even.

    Random draws (including the partner permutation) come from ``draw_mix_randomness`` with
    ``generator`` (on the images' device) unless ``draws`` is given.
    ``backend``: see ``kernels.dispatch`` (None = the process default, ``run.kernels``).
    ``donate=True`` hands ``images`` over to the op, as the original code (and timm) mixed in place:
    the native CPU op writes the mixed batch over it (MixedBatch.images is then ``images`` itself),
    the other backends return a new tensor. Either way the caller must not use ``images`` afterwards;
    the engine donates its strong views, which nothing else reads.
    Returns MixedBatch(images, label_a=label, label_b=label[partner], lam, mask).
    """
    _check_pseudo(images, prob, label)
    B, _, H, W = images.shape
    impl = dispatch.resolve(backend, images.device, images.dtype)
    if impl == "reference":
        return pseudo_mixup_reference(images, prob, label, threshold, cutmix_prob, generator, draws)
    if draws is None:
        draws = draw_mix_randomness(B, H, W, cutmix_prob, images.device, generator)
    _check_draws(draws, B)
    partner = draws.partner  # (B,)
    if impl != "torch":  # lam, the box, its correction and the mask are computed in the kernel
        args = (prob.float().contiguous(), draws.use_cutmix.contiguous(), draws.cy.contiguous(),
                draws.cx.contiguous(), partner.contiguous(), threshold)
        if _mix_in_place(donate, impl, images):
            lam, mask = dispatch.op(impl, "pseudo_mixup_")(images, *args)
            return MixedBatch(images, label, label[partner], lam, mask)
        out, lam, mask = dispatch.op(impl, "pseudo_mixup")(images.contiguous(), *args)
        return MixedBatch(out, label, label[partner], lam, mask)
    p = prob.float()  # (B,)
    p_partner = p[partner]  # (B,)
    total = p + p_partner  # (B,)
    lam = torch.where(total > 0, p / total, 0.5)  # (B,); two zero confidences mix half and half
    out, lam = mix_batch(images, lam, draws.use_cutmix, draws.cy, draws.cx, partner_index=partner, backend="torch")
    mask = (torch.maximum(p, p_partner) >= threshold).float()  # (B,)
    return MixedBatch(out, label, label[partner], lam, mask)


def _beta(alpha: float, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """One Beta(alpha, alpha) draw as a 0-d float32 tensor on ``device``, without a host sync."""
    g = torch._standard_gamma(torch.full((2,), alpha, device=device), generator=generator)  # (2,)
    return g[0] / (g[0] + g[1]).clamp_min(torch.finfo(g.dtype).tiny)


@torch.no_grad()
def labelled_mixup(
    images: Tensor,
    labels: Tensor,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    generator: torch.Generator | None = None,
    backend: str | None = None,
    donate: bool = False,
) -> MixedBatch:
    """timm ``Mixup`` in "batch" mode: one lam for the whole batch, partner = flip(0).

    With both alphas > 0: cutmix (lam ~ Beta(cutmix_alpha)) with probability ``switch_prob``, else
    mixup (lam ~ Beta(mixup_alpha)); an alpha of 0 disables that mode; both 0 returns the batch
    unchanged (the same tensor) with lam = 1. Cutmix lam is corrected to the clipped box.
    ``donate``: as for ``pseudo_mixup`` (timm mixes in place too).
    Returns MixedBatch(images, labels, labels.flip(0), lam (B,), mask of ones).
    """
    B, _, H, W = images.shape
    dev = images.device
    ones = torch.ones(B, dtype=torch.float32, device=dev)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return MixedBatch(images, labels, labels, ones, ones.clone())
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = torch.rand((), device=dev, generator=generator) < switch_prob  # ()
    else:
        use_cutmix = torch.full((), cutmix_alpha > 0, dtype=torch.bool, device=dev)
    lam_mix = _beta(mixup_alpha, dev, generator) if mixup_alpha > 0 else ones[0]
    lam_cut = _beta(cutmix_alpha, dev, generator) if cutmix_alpha > 0 else ones[0]
    lam = torch.where(use_cutmix, lam_cut, lam_mix)  # ()
    cy = torch.randint(0, H, (), device=dev, generator=generator)
    cx = torch.randint(0, W, (), device=dev, generator=generator)
    out, lam_b = mix_batch(images, lam.expand(B), use_cutmix.expand(B), cy.expand(B), cx.expand(B), backend=backend,
                           donate=donate)
    return MixedBatch(out, labels, labels.flip(0), lam_b, ones)
