"""The native ops' parallel plans: the in-place mixing along the permutation's cycles, and
results that do not depend on the thread count."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import EMA_SIZES, border_draws, ce_inputs, gen

from kernels.pseudo_mixup import random_derangement


def _permutations(B: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Partner permutations with every cycle structure the in-place ops walk: one B-cycle (the
    engine's draws), 2-cycles (flip(0)), fixed points, a mixture, a random permutation."""
    swap_and_fixed = torch.arange(B)
    swap_and_fixed[:2] = torch.tensor([1, 0])
    return {"cycle": random_derangement(B, "cpu", g), "flip": torch.arange(B - 1, -1, -1),
            "identity": torch.arange(B), "swap_and_fixed": swap_and_fixed, "random": torch.randperm(B, generator=g)}


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("B", "C", "H", "W", "dtype"), [
    (2, 3, 5, 7, torch.float32), (6, 3, 61, 67, torch.float32), (8, 3, 64, 64, torch.bfloat16),
    (80, 3, 16, 16, torch.float32), (7, 1, 200, 200, torch.float16)])
def test_native_inplace_ops_match_the_new_tensor_ops(native_ops, threads, B, C, H, W, dtype):
    """pseudo_mixup_ / mix_batch_ write over the images exactly what pseudo_mixup / mix_batch return,
    for any permutation and any split of the cycles between threads (the images are large enough here
    to be split; the originals each thread needs are copied aside first)."""
    g = gen(B * 100 + threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name, partner in _permutations(B, g).items():
            images = torch.randn(B, C, H, W, generator=g).to(dtype)
            prob, lam = torch.rand(B, generator=g), torch.rand(B, generator=g)
            d = border_draws(B, H, W, seed=B + threads)
            rest = (d.use_cutmix, d.cy, d.cx, partner)
            out, lam_out, mask = native_ops.pseudo_mixup(images, prob, *rest, 0.5)
            x = images.clone()
            lam_in, mask_in = native_ops.pseudo_mixup_(x, prob, *rest, 0.5)
            assert torch.equal(x, out) and torch.equal(lam_in, lam_out) and torch.equal(mask_in, mask), name
            out, lam_out = native_ops.mix_batch(images, lam, *rest)
            x = images.clone()
            assert torch.equal(native_ops.mix_batch_(x, lam, *rest), lam_out) and torch.equal(x, out), name
    finally:
        torch.set_num_threads(before)


def test_native_inplace_ops_need_a_permutation(native_ops):
    images = torch.zeros(4, 1, 2, 2)
    rest = (torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="partner must be a permutation of 0..3 \\(1 appears twice\\)"):
        native_ops.pseudo_mixup_(images, torch.rand(4), *rest, torch.tensor([1, 1, 2, 3]), 0.5)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        native_ops.mix_batch_(torch.zeros(4, 1, 2, 4)[..., ::2], torch.rand(4), *rest, torch.arange(4))


@pytest.mark.parametrize("threads", [1, 3])
def test_native_same_results_for_any_thread_count(native_ops, threads):
    """Each thread takes a contiguous share (rows, or a range of the concatenated EMA tensors): the
    results must not depend on how many threads there are."""
    g = gen(16)
    teacher = [torch.randn(n, generator=g) for n in EMA_SIZES]
    student = [torch.randn(n, generator=g) for n in EMA_SIZES]
    logits = torch.randn(96, 1000, generator=g)
    labels_lam = ce_inputs(96, 1000, torch.float32)[1:]
    images = torch.randn(6, 3, 61, 67, generator=g)  # large enough to be split between threads
    prob = torch.rand(6, generator=g)
    draws = border_draws(6, 61, 67, seed=17)

    def run():
        t = [x.clone() for x in teacher]
        native_ops.ema_update_(t, student, 0.9)
        return (t, native_ops.pseudo_label(logits, 0.5),
                native_ops.soft_target_ce(logits, *labels_lam, None, 0.1, True),
                native_ops.pseudo_mixup(images, prob, *draws, 0.5))

    before = torch.get_num_threads()
    try:
        expected = run()
        torch.set_num_threads(threads)
        got = run()
    finally:
        torch.set_num_threads(before)
    for e, x in zip(torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got)):
        assert torch.equal(e, x)

