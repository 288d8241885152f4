"""The native CPU ops (``torch.ops.semivit_native.*``, kernels/csrc) against the references in kernels/.

Calls the ops directly. Without a built library the tests skip with the build command, except under
``CI`` where they fail (CI must build it). Contract: docs/kernels.md.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch

from kernels import native
from kernels.ema import ema_update_reference
from kernels.pseudo_label import pseudo_label_reference
from kernels.pseudo_mixup import MixDraws, mix_batch, pseudo_mixup_reference, random_derangement
from kernels.soft_target_ce import soft_target_cross_entropy_reference

FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# (rtol, atol) for results rounded to each dtype; the kernels compute in float32 (float64 for float64)
TOL = {
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (2e-3, 1e-3),
    torch.float64: (1e-12, 1e-12),
}


@pytest.fixture(scope="module")
def ops():
    """The loaded op namespace; skips when the library is not built, fails under CI."""
    if not native.load():
        if os.environ.get("CI"):
            pytest.fail(f"{native.status()} (CI must build the native library)")
        pytest.skip(native.status())
    return torch.ops.semivit_native


# ------------------------------------------------------------------------- loading and status lines


def test_status_not_built_and_broken(monkeypatch, tmp_path):
    """The status line names the fix: build when missing, rebuild when the file does not load."""
    monkeypatch.setattr(native, "_loaded", False)
    monkeypatch.setattr(native, "_error", None)
    monkeypatch.setenv("SEMIVIT_NATIVE_LIB", str(tmp_path / "missing.so"))
    assert not native.available()
    assert native.status() == f"native: not built — run: {native.BUILD_COMMAND}"
    broken = tmp_path / "broken.so"
    broken.write_text("not a shared library")
    monkeypatch.setenv("SEMIVIT_NATIVE_LIB", str(broken))
    assert not native.load()
    line = native.status()
    assert line.startswith(f"native: failed to load {broken} (") and line.endswith(native.BUILD_COMMAND)
    assert "\n" not in line


def test_import_does_not_load_the_library():
    code = ("import kernels, torch; import kernels.native as n; "
            "assert not any('semivit_native' in p for p in torch.ops.loaded_libraries), torch.ops.loaded_libraries; "
            "assert not n._loaded")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=native._REPO_ROOT, capture_output=True)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ EMA


# a few tiny tensors and two that span the threads' shares of the concatenation
_EMA_SIZES = [1, 3, 70001, 7, 0, 65536, 5, 13 * 17]
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
def test_ema_update(ops, t_dtype, s_dtype, decay):
    g = _gen(1)
    teacher = [torch.randn(n, generator=g).to(t_dtype) for n in _EMA_SIZES]
    student = [torch.randn(n, generator=g).to(s_dtype) for n in _EMA_SIZES]
    expected = [t.clone() for t in teacher]
    ema_update_reference(expected, student, decay)
    # the contract's formula, each step rounded like the kernel: t + w (s - t), w = 1 - decay
    compute = torch.promote_types(t_dtype, torch.float32)
    exact = [(t.to(compute) + (s.to(compute) - t.to(compute)) * (1.0 - decay)).to(t_dtype)
             for t, s in zip(teacher, student)]
    ops.ema_update_(teacher, student, decay)
    rtol, atol = TOL[t_dtype]
    for t, e, x in zip(teacher, expected, exact):
        assert torch.equal(t, x)
        torch.testing.assert_close(t, e, rtol=2 * rtol, atol=2 * atol)  # the reference rounds twice


def test_ema_update_vit_sized_list(ops):
    """~150 tensors of mixed sizes, some very small, in one call."""
    g = _gen(2)
    sizes = [int(s) for s in torch.randint(1, 5000, (150,), generator=g)]
    teacher = [torch.randn(n, generator=g) for n in sizes]
    student = [torch.randn(n, generator=g) for n in sizes]
    expected = [t + (s - t) * (1.0 - 0.99) for t, s in zip(teacher, student)]
    ops.ema_update_(teacher, student, 0.99)
    assert all(torch.equal(t, e) for t, e in zip(teacher, expected))


def test_ema_update_errors(ops):
    t = [torch.zeros(4)]
    with pytest.raises(RuntimeError, match="has 3"):
        ops.ema_update_(t, [torch.zeros(3)], 0.9)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.ema_update_([torch.zeros(4, 2).t()], [torch.zeros(8)], 0.9)
    with pytest.raises(RuntimeError, match="teacher\\[0\\]"):
        ops.ema_update_([torch.zeros(4, dtype=torch.int64)], [torch.zeros(4)], 0.9)
    with pytest.raises(RuntimeError, match="decay"):
        ops.ema_update_(t, [torch.zeros(4)], 1.5)


# -------------------------------------------------------------------------------- pseudo labels


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(("N", "C"), [(2, 3), (5, 7), (64, 1000), (6, 21841), (3, 1)])
def test_pseudo_label(ops, dtype, N, C):
    logits = (torch.randn(N, C, generator=_gen(N * C)) * 4).to(dtype)
    prob, label, mask = ops.pseudo_label(logits, 0.3)
    ref_prob, ref_label, _ = pseudo_label_reference(logits, 0.3)
    assert prob.dtype == mask.dtype == torch.float32 and label.dtype == torch.int64
    assert torch.equal(label, ref_label)  # first maximum, exactly
    torch.testing.assert_close(prob, ref_prob, rtol=1e-5, atol=1e-7)  # the reference works in float32
    if dtype == torch.float64:  # the kernel in float64
        exact = torch.softmax(logits, dim=-1).amax(dim=-1).float()
        torch.testing.assert_close(prob, exact, rtol=1e-7, atol=0.0)
    assert torch.equal(mask, (prob >= 0.3).float())


def test_pseudo_label_ties_and_extremes(ops):
    logits = torch.tensor([
        [1.0, 5.0, 2.0, 5.0, 5.0],  # ties: the first maximum
        [0.0, 0.0, 0.0, 0.0, 0.0],  # uniform: prob 1/C
        [-1e4, 3.0, -float("inf"), 2.0, -3e38],  # huge negative gaps and -inf
        [80.0, -80.0, 0.0, 79.0, 1.0],
    ])
    prob, label, mask = ops.pseudo_label(logits, 0.5)
    ref_prob, ref_label, ref_mask = pseudo_label_reference(logits, 0.5)
    assert label.tolist() == ref_label.tolist() == [1, 0, 1, 0]
    torch.testing.assert_close(prob, ref_prob, rtol=1e-6, atol=1e-7)
    assert torch.equal(mask, ref_mask)
    # threshold compared in float32, like torch's prob >= threshold
    p = ops.pseudo_label(torch.zeros(1, 5), 0.2)[0]
    assert ops.pseudo_label(torch.zeros(1, 5), float(p))[2].item() == 1.0


def test_pseudo_label_errors(ops):
    with pytest.raises(RuntimeError, match="\\(N, C\\)"):
        ops.pseudo_label(torch.zeros(3), 0.5)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.pseudo_label(torch.zeros(4, 3).t(), 0.5)
    with pytest.raises(RuntimeError, match="float32/float64"):
        ops.pseudo_label(torch.zeros(2, 3, dtype=torch.int32), 0.5)


# --------------------------------------------------------------------------------- pseudo mixup


def _draws(B: int, H: int, W: int, seed: int, cut_every: int = 2) -> MixDraws:
    """Deterministic draws that put box centres on every border: cy, cx cycle 0, H-1 / W-1, middle."""
    g = _gen(seed)
    use_cutmix = (torch.arange(B) % cut_every) == 0
    cy = torch.tensor([(0, H - 1, H // 2, min(1, H - 1))[i % 4] for i in range(B)])
    cx = torch.tensor([(W - 1, 0, W // 3, max(W - 2, 0))[(i // 2) % 4] for i in range(B)])
    return MixDraws(use_cutmix, cy, cx, random_derangement(B, "cpu", g))


def _check_mixed(out, ref, use_cutmix, dtype):
    cut = use_cutmix.nonzero().flatten()
    assert torch.equal(out[cut], ref[cut])  # cutmix pixels: plain copies, exactly
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(("B", "C", "H", "W"), [(2, 1, 13, 17), (8, 3, 31, 29), (6, 2, 1, 5)])
def test_pseudo_mixup(ops, dtype, B, C, H, W):
    g = _gen(B * H * W)
    images = torch.randn(B, C, H, W, generator=g).to(dtype)
    prob = torch.rand(B, generator=g)
    prob[0] = 1e-6  # lam near 0 for sample 0 (box as large as the image), near 1 for its partner
    prob[1] = 0.999
    label = torch.arange(B)
    draws = _draws(B, H, W, seed=B)
    before = images.clone()
    out, lam, mask = ops.pseudo_mixup(images, prob, *draws, 0.6)
    ref = pseudo_mixup_reference(images, prob, label, 0.6, draws=draws)
    assert torch.equal(images, before)  # the input is never modified
    assert out.dtype == dtype and out.shape == images.shape
    assert torch.equal(lam, ref.lam) and torch.equal(mask, ref.mask)
    _check_mixed(out, ref.images, draws.use_cutmix, dtype)


def test_pseudo_mixup_zero_confidences(ops):
    """p_i = p_j = 0: lam = 0.5 (no NaN), for mixup and cutmix samples."""
    B, H, W = 4, 13, 17
    images = torch.randn(B, 3, H, W, generator=_gen(3))
    prob = torch.zeros(B)
    draws = _draws(B, H, W, seed=4)
    out, lam, mask = ops.pseudo_mixup(images, prob, *draws, 0.5)
    ref = pseudo_mixup_reference(images, prob, torch.arange(B), 0.5, draws=draws)
    assert torch.isfinite(out).all() and torch.isfinite(lam).all()
    assert torch.equal(lam[~draws.use_cutmix], torch.full(((~draws.use_cutmix).sum(),), 0.5))
    assert torch.equal(lam, ref.lam) and torch.equal(mask, ref.mask) and not mask.any()
    _check_mixed(out, ref.images, draws.use_cutmix, torch.float32)


def _torch_mix_batch(*args):
    """kernels.pseudo_mixup.mix_batch on its torch path (the vectorised core the native op replaces)."""
    kw = {"backend": "torch"} if "backend" in inspect.signature(mix_batch).parameters else {}
    return mix_batch(*args, **kw)


@pytest.mark.parametrize("dtype", FLOATS)
def test_mix_batch(ops, dtype):
    B, C, H, W = 8, 3, 31, 29
    g = _gen(5)
    images = torch.randn(B, C, H, W, generator=g).to(dtype)
    # lam below 0 makes boxes larger than the image (clipped on every side); near 0 and 1; plain values
    lam = torch.tensor([-10.0, 1e-7, 1.0 - 1e-7, 1.0, 0.0, 0.3, 0.77, 0.5])
    use_cutmix = torch.tensor([True, True, True, True, True, False, False, True])
    cy = torch.tensor([0, H - 1, 5, 0, H - 1, 3, 4, 15])
    cx = torch.tensor([W - 1, 0, 0, 7, W - 1, 2, 1, 14])
    partner = random_derangement(B, "cpu", g)
    out, lam_out = ops.mix_batch(images, lam, use_cutmix, cy, cx, partner)
    ref, ref_lam = _torch_mix_batch(images, lam, use_cutmix, cy, cx, partner)
    assert torch.equal(lam_out, ref_lam)
    assert lam_out[0].item() == 0.0  # the whole image came from the partner
    _check_mixed(out, ref, use_cutmix, dtype)
    # timm "batch" mode: one lam, partner flip(0)
    flip = torch.arange(B - 1, -1, -1)
    for cut in (True, False):
        args = (lam[5].expand(B), torch.tensor(cut).expand(B), cy[7].expand(B), cx[7].expand(B))
        out, lam_out = ops.mix_batch(images, *(a.contiguous() for a in args), flip)
        ref, ref_lam = _torch_mix_batch(images, *args)
        assert torch.equal(lam_out, ref_lam)
        _check_mixed(out, ref, args[1], dtype)


def _permutations(B: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Partner permutations with every cycle structure the in-place ops walk: one B-cycle (the
    engine's draws), 2-cycles (flip(0)), fixed points, a mixture, a random permutation."""
    swap_and_fixed = torch.arange(B)
    swap_and_fixed[:2] = torch.tensor([1, 0])
    return {"cycle": random_derangement(B, "cpu", g), "flip": torch.arange(B - 1, -1, -1),
            "identity": torch.arange(B), "swap_and_fixed": swap_and_fixed, "random": torch.randperm(B, generator=g)}


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("B", "C", "H", "W", "dtype"), [(2, 3, 5, 7, torch.float32), (6, 3, 61, 67, torch.float32),
                                                          (8, 3, 64, 64, torch.bfloat16), (80, 3, 16, 16, torch.float32),
                                                          (7, 1, 200, 200, torch.float16)])
def test_inplace_ops_match_the_new_tensor_ops(ops, threads, B, C, H, W, dtype):
    """pseudo_mixup_ / mix_batch_ write over the images exactly what pseudo_mixup / mix_batch return,
    for any permutation and any split of the cycles between threads (the images are large enough here
    to be split; the originals each thread needs are copied aside first)."""
    g = _gen(B * 100 + threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name, partner in _permutations(B, g).items():
            images = torch.randn(B, C, H, W, generator=g).to(dtype)
            prob, lam = torch.rand(B, generator=g), torch.rand(B, generator=g)
            d = _draws(B, H, W, seed=B + threads)
            rest = (d.use_cutmix, d.cy, d.cx, partner)
            out, lam_out, mask = ops.pseudo_mixup(images, prob, *rest, 0.5)
            x = images.clone()
            lam_in, mask_in = ops.pseudo_mixup_(x, prob, *rest, 0.5)
            assert torch.equal(x, out) and torch.equal(lam_in, lam_out) and torch.equal(mask_in, mask), name
            out, lam_out = ops.mix_batch(images, lam, *rest)
            x = images.clone()
            assert torch.equal(ops.mix_batch_(x, lam, *rest), lam_out) and torch.equal(x, out), name
    finally:
        torch.set_num_threads(before)


def test_inplace_ops_when_openmp_gives_fewer_threads_than_asked(ops):
    """OMP_THREAD_LIMIT=1 with torch set to 3 threads: the op plans 3 shares, the team has 1 thread,
    which must then visit every share (a share left unvisited would leave images unmixed)."""
    script = (
        "import torch, kernels.native\n"
        "assert kernels.native.load()\n"
        "torch.set_num_threads(3)\n"
        "from kernels.pseudo_mixup import draw_mix_randomness\n"
        "g = torch.Generator().manual_seed(0)\n"
        "images, prob = torch.randn(12, 3, 64, 64, generator=g), torch.rand(12, generator=g)\n"
        "d = draw_mix_randomness(12, 64, 64, 0.5, 'cpu', g)\n"
        "out, _, _ = torch.ops.semivit_native.pseudo_mixup(images, prob, *d, 0.5)\n"
        "torch.ops.semivit_native.pseudo_mixup_(images, prob, *d, 0.5)\n"
        "assert torch.equal(images, out)\n"
    )
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=native._REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_inplace_ops_need_a_permutation(ops):
    images = torch.zeros(4, 1, 2, 2)
    rest = (torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="partner must be a permutation of 0..3 \\(1 appears twice\\)"):
        ops.pseudo_mixup_(images, torch.rand(4), *rest, torch.tensor([1, 1, 2, 3]), 0.5)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        ops.mix_batch_(torch.zeros(4, 1, 2, 4)[..., ::2], torch.rand(4), *rest, torch.arange(4))


def test_mix_errors(ops):
    B, H, W = 2, 5, 6
    images = torch.zeros(B, 1, H, W)
    ok = (torch.full((B,), 0.5), torch.ones(B, dtype=torch.bool), torch.zeros(B, dtype=torch.long),
          torch.zeros(B, dtype=torch.long), torch.tensor([1, 0]))
    ops.mix_batch(images, *ok)
    with pytest.raises(RuntimeError, match="cy\\[1\\] = 5"):
        ops.mix_batch(images, ok[0], ok[1], torch.tensor([0, H]), ok[3], ok[4])
    with pytest.raises(RuntimeError, match="partner"):
        ops.mix_batch(images, *ok[:4], torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match="use_cutmix must be Bool"):
        ops.mix_batch(images, ok[0], ok[1].long(), *ok[2:])
    with pytest.raises(RuntimeError, match="\\(B, C, H, W\\)"):
        ops.mix_batch(images[0], *ok)
    with pytest.raises(RuntimeError, match="prob must have shape"):
        ops.pseudo_mixup(images, torch.zeros(3), *ok[1:], 0.5)


# ------------------------------------------------------------------------------- soft-target CE


def _ce_inputs(B: int, C: int, dtype: torch.dtype, seed: int = 0):
    g = _gen(seed)
    logits = (torch.randn(B, C, generator=g) * 3).to(dtype)
    label_a = torch.randint(0, C, (B,), generator=g)
    label_b = torch.randint(0, C, (B,), generator=g)
    label_b[0] = label_a[0]  # a = b
    label_a[-1], label_b[-1] = 0, C - 1  # first and last class
    lam = torch.rand(B, generator=g)
    return logits, label_a, label_b, lam


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(("B", "C"), [(2, 3), (5, 7), (80, 1000), (4, 21841)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("with_mask", [True, False])
def test_soft_target_ce(ops, dtype, B, C, smoothing, with_mask):
    logits, label_a, label_b, lam = _ce_inputs(B, C, dtype, seed=B + C)
    mask = (torch.arange(B) % 3 != 1).float() if with_mask else None
    compute = torch.promote_types(dtype, torch.float32)
    z = logits.clone().requires_grad_()
    loss, grad = ops.soft_target_ce(z, label_a, label_b, lam, mask, smoothing, True)
    assert loss.dtype == grad.dtype == compute and loss.shape == () and grad.shape == (B, C)
    assert loss.requires_grad and not grad.requires_grad
    loss.backward()
    zr = logits.clone().requires_grad_()
    ref = soft_target_cross_entropy_reference(zr, label_a, label_b, lam, mask, smoothing)
    ref.backward()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(loss, ref, **tol)
    assert z.grad.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(z.grad, zr.grad, rtol=max(rtol, 1e-5), atol=max(atol, 1e-7))
    # the forward's gradient is d loss / d logits in the compute dtype, rounded once to the logits' dtype
    assert torch.equal(grad.to(dtype), z.grad)
    alone, none = ops.soft_target_ce(logits, label_a, label_b, lam, mask, smoothing, False)
    assert none.shape == (0,) and torch.equal(alone, loss.detach())


def test_soft_target_ce_scales_by_the_upstream_gradient(ops):
    """The backward multiplies the saved d loss / d logits by the upstream gradient (any value, float32
    logits with a float64 loss above them included)."""
    logits, label_a, label_b, lam = _ce_inputs(6, 7, torch.float32, seed=9)
    t = torch.full((6, 7), 0.1 / 7)
    t[torch.arange(6), label_a] += 0.9 * lam
    t[torch.arange(6), label_b] += 0.9 * (1 - lam)
    z = logits.clone().requires_grad_()
    loss, _ = ops.soft_target_ce(z, label_a, label_b, lam, None, 0.1, True)
    (loss.double() * -2.5).backward()
    torch.testing.assert_close(z.grad, -2.5 / 6 * (torch.softmax(logits, -1) - t), rtol=1e-5, atol=1e-6)


def test_soft_target_ce_gradcheck(ops):
    logits, label_a, label_b, lam = _ce_inputs(3, 7, torch.float64, seed=11)
    z = logits.requires_grad_()
    mask = torch.tensor([1.0, 0.0, 0.5])
    # first derivatives only: the saved gradient is not differentiable again (as the torch version)
    assert torch.autograd.gradcheck(lambda x: ops.soft_target_ce(x, label_a, label_b, lam, mask, 0.1, True)[0], (z,))


def test_soft_target_ce_errors(ops):
    logits, label_a, label_b, lam = _ce_inputs(2, 3, torch.float32)
    with pytest.raises(RuntimeError, match="label_a\\[1\\] = 3 is outside"):
        ops.soft_target_ce(logits, torch.tensor([0, 3]), label_b, lam, None, 0.1, False)
    with pytest.raises(RuntimeError, match="lam must be Float"):
        ops.soft_target_ce(logits, label_a, label_b, lam.double(), None, 0.1, False)
    with pytest.raises(RuntimeError, match="mask must have shape \\(2,\\)"):
        ops.soft_target_ce(logits, label_a, label_b, lam, torch.ones(3), 0.1, False)
    with pytest.raises(RuntimeError, match="call it with with_grad=True"):
        ops.soft_target_ce(logits.requires_grad_(), label_a, label_b, lam, None, 0.1, False)


# ------------------------------------------------------------------- threads, opcheck, meta, compile


@pytest.mark.parametrize("threads", [1, 3])
def test_same_results_for_any_thread_count(ops, threads):
    """Each thread takes a contiguous share (rows, or a range of the concatenated EMA tensors): the
    results must not depend on how many threads there are."""
    g = _gen(16)
    teacher = [torch.randn(n, generator=g) for n in _EMA_SIZES]
    student = [torch.randn(n, generator=g) for n in _EMA_SIZES]
    logits = torch.randn(96, 1000, generator=g)
    labels_lam = _ce_inputs(96, 1000, torch.float32)[1:]
    images = torch.randn(6, 3, 61, 67, generator=g)  # large enough to be split between threads
    prob = torch.rand(6, generator=g)
    draws = _draws(6, 61, 67, seed=17)

    def run():
        t = [x.clone() for x in teacher]
        ops.ema_update_(t, student, 0.9)
        return (t, ops.pseudo_label(logits, 0.5), ops.soft_target_ce(logits, *labels_lam, None, 0.1, True),
                ops.pseudo_mixup(images, prob, *draws, 0.5))

    before = torch.get_num_threads()
    try:
        expected = run()
        torch.set_num_threads(threads)
        got = run()
    finally:
        torch.set_num_threads(before)
    for e, x in zip(torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got)):
        assert torch.equal(e, x)



def _op_samples():
    g = _gen(12)
    B, H, W = 4, 13, 17
    images = torch.randn(B, 3, H, W, generator=g)
    draws = _draws(B, H, W, seed=13)
    logits, label_a, label_b, lam = _ce_inputs(B, 7, torch.float64, seed=14)
    return [
        ("ema_update_", ([torch.randn(5), torch.randn(3, 2)], [torch.randn(5), torch.randn(3, 2)], 0.9)),
        ("pseudo_label", (torch.randn(B, 7, generator=g), 0.3)),
        ("pseudo_mixup", (images, torch.rand(B, generator=g), *draws, 0.5)),
        ("mix_batch", (images, torch.rand(B, generator=g), *draws)),
        ("pseudo_mixup_", (images.clone(), torch.rand(B, generator=g), *draws, 0.5)),
        ("mix_batch_", (images.clone(), torch.rand(B, generator=g), *draws)),
        ("soft_target_ce", (logits.clone().requires_grad_(), label_a, label_b, lam, torch.rand(B, generator=g), 0.1,
                            True)),
    ]


@pytest.mark.parametrize("name", [n for n, _ in _op_samples()])
def test_opcheck(ops, name):
    args = dict(_op_samples())[name]
    torch.library.opcheck(getattr(ops, name).default, args)


def test_meta_device(ops):
    m = torch.device("meta")
    B, H, W = 4, 13, 17
    prob, label, mask = ops.pseudo_label(torch.empty(B, 10, device=m, dtype=torch.bfloat16), 0.5)
    assert prob.device == m and prob.shape == (B,) and label.dtype == torch.int64 and mask.dtype == torch.float32
    images = torch.empty(B, 3, H, W, device=m, dtype=torch.bfloat16)
    draws = [t.to(m) for t in _draws(B, H, W, seed=1)]
    out, lam, mask = ops.pseudo_mixup(images, torch.empty(B, device=m), *draws, 0.5)
    assert out.shape == images.shape and out.dtype == torch.bfloat16 and lam.shape == mask.shape == (B,)
    out, lam = ops.mix_batch(images, torch.empty(B, device=m), *draws)
    assert out.shape == images.shape and lam.dtype == torch.float32
    lam, mask = ops.pseudo_mixup_(images, torch.empty(B, device=m), *draws, 0.5)
    assert lam.is_meta and lam.shape == mask.shape == (B,)
    assert ops.mix_batch_(images, torch.empty(B, device=m), *draws).shape == (B,)
    z = torch.empty(B, 10, device=m, dtype=torch.float64, requires_grad=True)
    labels = torch.zeros(B, dtype=torch.long, device=m)
    loss, grad = ops.soft_target_ce(z, labels, labels, torch.empty(B, device=m), None, 0.1, True)
    assert loss.dtype == grad.dtype == torch.float64 and loss.shape == () and grad.shape == (B, 10)
    loss.backward()
    assert z.grad.shape == z.shape and z.grad.device == m
    t = [torch.empty(3, device=m)]
    ops.ema_update_(t, [torch.empty(3, device=m)], 0.9)


def test_compile_fullgraph_soft_target_ce(ops):
    logits, label_a, label_b, lam = _ce_inputs(4, 7, torch.float32, seed=15)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0])

    def loss_fn(z, a, b, w, m):
        loss, _ = torch.ops.semivit_native.soft_target_ce(z, a, b, w, m, 0.1, True)
        return loss

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")  # dynamo + AOTAutograd through the fake impl and autograd; inductor adds ~20 s
    z1 = logits.clone().requires_grad_()
    z2 = logits.clone().requires_grad_()
    out = compiled(z1, label_a, label_b, lam, mask)
    out.backward()
    ref = loss_fn(z2, label_a, label_b, lam, mask)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(z1.grad, z2.grad)
