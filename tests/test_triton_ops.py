"""The Triton ops (kernels/triton_ops) against the references in kernels/*.py.

Runs on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, which tests/conftest.py sets
when there is no CUDA device), or on CUDA when a GPU is present (``impl_device``). Shapes are small
and awkward because the interpreter is slow. Without Triton the module is skipped, or fails when the
environment variable CI is set.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import impl_device

try:
    import triton  # noqa: F401
except ImportError as err:
    if os.environ.get("CI"):
        raise ImportError(f"triton is not importable but CI is set: the Triton ops must be tested ({err})") from err
    pytest.skip(f"triton is not importable (pip install -e '.[gpu]'): {err}", allow_module_level=True)

from kernels import triton_ops  # noqa: E402

if not triton_ops.load():
    if os.environ.get("CI"):
        raise RuntimeError(f"Triton ops unavailable in CI: {triton_ops.status()}")
    pytest.skip(f"Triton ops unavailable: {triton_ops.status()}", allow_module_level=True)

from kernels.ema import ema_update_reference  # noqa: E402
from kernels.pseudo_label import pseudo_label_reference  # noqa: E402
from kernels.pseudo_mixup import MixDraws, mix_batch, pseudo_mixup_reference  # noqa: E402
from kernels.soft_target_ce import soft_target_cross_entropy_reference  # noqa: E402
from kernels.triton_ops import ema as triton_ema  # noqa: E402

ops = torch.ops.semivit_triton
DEV = impl_device("triton")
ROOT = Path(__file__).resolve().parents[1]
# tolerances for results rounded to the input dtype (one rounding step, plus the reference's own)
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=1.6e-2, rtol=1e-2),
       torch.float16: dict(atol=2e-3, rtol=1e-3), torch.float64: dict(atol=1e-12, rtol=1e-12)}


def test_status_and_registration():
    assert triton_ops.available()
    line = triton_ops.status()
    assert line.startswith("triton ") and "\n" not in line
    for name in triton_ops.OPS:
        assert hasattr(ops, name), name


# -------------------------------------------------------------------------------------------- EMA


class _CountLaunches:
    """Stands in for the jitted kernel and counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def _ema_expected(teacher, student, decay):
    """t + (1 - decay)(s - t) in float32, rounded once (what the contract says)."""
    return [(t.float() + (1 - decay) * (s.float() - t.float())).to(t.dtype) for t, s in zip(teacher, student)]


def test_ema_one_launch_per_dtype_group_matches_reference(monkeypatch):
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
        ops.ema_update_(teacher, student, decay)
        for t, r in zip(teacher, reference):
            torch.testing.assert_close(t, r, atol=1e-6, rtol=1e-6)
    assert counter.launches == 2 * 4  # one per dtype group per update, never one per tensor
    assert len(triton_ema._cache) == 1  # one plan (a table per group), built once and reused
    plan = next(iter(triton_ema._cache.values()))
    ops.ema_update_(teacher, student, 0.9)
    assert next(iter(triton_ema._cache.values())) is plan
    ops.ema_update_(teacher[:3], student[:3], 0.9)  # another set of tensors: another plan
    assert len(triton_ema._cache) == 2
    triton_ema.clear_cache()


@pytest.mark.parametrize("t_dtype,s_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.float32, torch.float16), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.bfloat16)])
def test_ema_dtypes(t_dtype, s_dtype):
    g = torch.Generator().manual_seed(1)
    sizes = [(5,), (1280,), (33, 7), (1,)]
    teacher = [torch.randn(s, generator=g).to(DEV, t_dtype) for s in sizes]
    student = [torch.randn(s, generator=g).to(DEV, s_dtype) for s in sizes]
    expected = _ema_expected(teacher, student, 0.9)
    ops.ema_update_(teacher, student, 0.9)
    for t, e in zip(teacher, expected):
        assert t.dtype == t_dtype
        torch.testing.assert_close(t, e, **TOL[t_dtype])


def test_ema_rejects_what_it_cannot_do():
    t = torch.zeros(4, device=DEV)
    with pytest.raises(ValueError, match="float64"):
        ops.ema_update_([t.double()], [t.double()], 0.9)
    with pytest.raises(ValueError, match="elements"):
        ops.ema_update_([t], [torch.zeros(5, device=DEV)], 0.9)
    with pytest.raises(ValueError, match="contiguous"):
        ops.ema_update_([torch.zeros(4, 4, device=DEV).t()], [torch.zeros(4, 4, device=DEV)], 0.9)
    with pytest.raises(ValueError, match="contiguous"):
        ops.ema_update_([torch.zeros(4, 4, device=DEV)], [torch.zeros(4, 4, device=DEV).t()], 0.9)
    with pytest.raises(ValueError, match="decay"):
        ops.ema_update_([t], [t.clone()], 1.5)


def test_ema_compiles_as_an_opaque_op():
    teacher = [torch.zeros(5, device=DEV), torch.ones(3, device=DEV)]
    student = [torch.ones(5, device=DEV), torch.zeros(3, device=DEV)]

    @torch.compile(fullgraph=True, backend="aot_eager")  # functionalised through the fake impl
    def step(ts, ss):
        ops.ema_update_(ts, ss, 0.75)

    step(teacher, student)
    torch.testing.assert_close(teacher[0], torch.full((5,), 0.25, device=DEV))
    torch.testing.assert_close(teacher[1], torch.full((3,), 0.75, device=DEV))


# ----------------------------------------------------------------------------------- pseudo label


@pytest.mark.parametrize("C,dtype", [(7, torch.float32), (1000, torch.float32), (1000, torch.bfloat16),
                                     (1000, torch.float16), (129, torch.float64), (21841, torch.float32),
                                     (21841, torch.bfloat16)])
def test_pseudo_label(C, dtype):
    g = torch.Generator().manual_seed(C)
    z = (torch.randn(3, C, generator=g) * 4).to(dtype)
    z[1, 2] = z[1].max() + 1  # a tie: the first index wins
    z[1, C - 1] = z[1, 2]
    z[2] = z[2, 0]  # all equal: prob 1 / C, label 0
    prob, label, mask = ops.pseudo_label(z.to(DEV), 0.05)
    rp, rl, rm = pseudo_label_reference(z, 0.05)
    torch.testing.assert_close(prob.cpu(), rp, atol=1e-6, rtol=1e-5)
    assert label.dtype == torch.int64 and torch.equal(label.cpu(), rl)
    assert label[1] == 2 and label[2] == 0
    assert mask.dtype == torch.float32 and torch.equal(mask.cpu(), rm)


# ----------------------------------------------------------------------------------- pseudo mixup

B, CH, H, W = 6, 3, 13, 17  # H x W not multiples of any block


def _draws():
    """Boxes touching / clipped at every border, one covering everything, mixup samples too."""
    use_cutmix = torch.tensor([True, True, True, True, False, False])
    cy = torch.tensor([0, H - 1, 6, 1, 0, 5])
    cx = torch.tensor([0, W - 1, 8, W - 2, 0, 3])
    partner = torch.tensor([3, 2, 5, 4, 1, 0])  # a single 6-cycle
    return use_cutmix, cy, cx, partner


def _check_mixup(out, lam, mask, ref, use_cutmix, dtype):
    assert out.dtype == dtype and lam.dtype == torch.float32 and mask.dtype == torch.float32
    cut = use_cutmix
    assert torch.equal(out.cpu()[cut], ref.images[cut])  # cutmix pixels are exact copies
    torch.testing.assert_close(out.cpu(), ref.images, **TOL[dtype])
    torch.testing.assert_close(lam.cpu(), ref.lam, atol=0, rtol=0)
    assert torch.equal(mask.cpu(), ref.mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_pseudo_mixup_matches_reference(dtype):
    g = torch.Generator().manual_seed(2)
    images = torch.randn(B, CH, H, W, generator=g).to(dtype)
    # lam near 0: sample 0 (cutmix, a full-size box clipped at the corner) and 4 (mixup); near 1: sample 3
    # (cutmix, empty box) and 5 (mixup); moderate: 1 (clipped at the bottom-right corner) and 2 (inside)
    prob = torch.tensor([1e-6, 0.5, 0.6, 0.999, 1e-6, 0.45])
    use_cutmix, cy, cx, partner = _draws()
    before = images.clone()
    out, lam, mask = ops.pseudo_mixup(images.to(DEV), prob.to(DEV), use_cutmix.to(DEV), cy.to(DEV), cx.to(DEV),
                                      partner.to(DEV), 0.7)
    ref = pseudo_mixup_reference(images, prob, torch.arange(B), 0.7, draws=MixDraws(use_cutmix, cy, cx, partner))
    _check_mixup(out, lam, mask, ref, use_cutmix, dtype)
    assert torch.equal(images, before)  # input untouched
    assert lam[3] == 1.0 and lam[4] < 1e-5 and lam[5] > 0.9999 and (lam[:3] < 0.9).all()


def test_pseudo_mixup_zero_confidence_gives_half():
    g = torch.Generator().manual_seed(3)
    images = torch.randn(B, CH, H, W, generator=g)
    prob = torch.tensor([0.0, 0.0, 0.8, 0.0, 0.0, 0.0])  # p_i + p_j = 0 for samples 0, 3, 4 (and not 1, 2, 5)
    use_cutmix, cy, cx, partner = _draws()
    out, lam, mask = ops.pseudo_mixup(images.to(DEV), prob.to(DEV), use_cutmix.to(DEV), cy.to(DEV), cx.to(DEV),
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
def test_mix_batch_matches_torch_path(dtype):
    g = torch.Generator().manual_seed(4)
    images = torch.randn(B, CH, H, W, generator=g).to(dtype)
    lam = torch.tensor([0.0, 1.0, 0.0, 0.999, 0.0, 1.0])  # lam 0 / 1 for cutmix and mixup samples
    use_cutmix, cy, cx, partner = _draws()
    out, lam_out = ops.mix_batch(images.to(DEV), lam.to(DEV), use_cutmix.to(DEV), cy.to(DEV), cx.to(DEV),
                                 partner.to(DEV))
    exp_out, exp_lam = mix_batch(images, lam, use_cutmix, cy, cx, partner)
    assert torch.equal(out.cpu()[use_cutmix], exp_out[use_cutmix])
    torch.testing.assert_close(out.cpu(), exp_out, **TOL[dtype])
    torch.testing.assert_close(lam_out.cpu(), exp_lam, atol=0, rtol=0)
    # lam 0 centred: box [0, 12) x [0, 16) touching the top and left borders (odd H, W: // 2 leaves a row / column)
    assert lam_out[2].item() == torch.tensor(1.0 - 12 * 16 / (H * W)).float().item()
    assert lam_out[1] == 1.0 and lam_out[3] == 1.0  # empty boxes
    assert torch.equal(out[4].cpu(), images[partner[4]]) and torch.equal(out[5].cpu(), images[5])  # mixup lam 0 / 1


def test_mix_tiles_over_rows_and_columns(monkeypatch):
    """Tiles smaller than a row (several column tiles, several row tiles): same result, bit for bit."""
    from kernels.triton_ops import pseudo_mixup as triton_mix

    g = torch.Generator().manual_seed(5)
    images = torch.randn(B, CH, H, W, generator=g).to(DEV)
    prob = torch.rand(B, generator=g).to(DEV)
    draws = [t.to(DEV) for t in _draws()]
    expected = ops.pseudo_mixup(images, prob, *draws, 0.5)
    monkeypatch.setitem(triton_mix.CONFIG, "block", 32)
    monkeypatch.setitem(triton_mix.CONFIG, "max_block_w", 8)  # 3 column tiles of 8 for W = 17, 4 rows a tile
    got = ops.pseudo_mixup(images, prob, *draws, 0.5)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_pseudo_mixup_box_arithmetic_against_python():
    """Every cy, cx of a small image with a lam whose box is clipped: lam_out is the spec's float64 area."""
    h, w, n = 5, 7, 35
    images = torch.randn(n, 1, h, w)
    lam_in = torch.full((n,), 0.36)  # r = 0.8: cut 4 x 5, half 2 x 2
    cy = torch.arange(n) // w
    cx = torch.arange(n) % w
    partner = torch.arange(n).roll(1)
    out, lam = ops.mix_batch(images.to(DEV), lam_in.to(DEV), torch.ones(n, dtype=torch.bool, device=DEV),
                             cy.to(DEV), cx.to(DEV), partner.to(DEV))
    r = math.sqrt(max(1.0 - float(lam_in[0]), 0.0))
    for i in range(n):
        y0, y1 = min(max(int(cy[i]) - int(h * r) // 2, 0), h), min(max(int(cy[i]) + int(h * r) // 2, 0), h)
        x0, x1 = min(max(int(cx[i]) - int(w * r) // 2, 0), w), min(max(int(cx[i]) + int(w * r) // 2, 0), w)
        assert lam[i].item() == pytest.approx(1.0 - (y1 - y0) * (x1 - x0) / (h * w), abs=1e-7)
        expected = images[i].clone()
        expected[:, y0:y1, x0:x1] = images[int(partner[i])][:, y0:y1, x0:x1]
        assert torch.equal(out[i].cpu(), expected)


# --------------------------------------------------------------------------------------- soft CE


@pytest.mark.parametrize("Bn,C,dtype", [(3, 7, torch.float32), (3, 1000, torch.float32), (3, 1000, torch.bfloat16),
                                        (3, 1000, torch.float16), (2, 21841, torch.float32)])
def test_soft_target_ce_forward_backward(Bn, C, dtype):
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
    loss, grad = ops.soft_target_ce(zt, a.to(DEV), b.to(DEV), lam.to(DEV), mask.to(DEV), s, True)
    assert loss.dtype == grad.dtype == torch.float32 and loss.shape == () and not grad.requires_grad
    loss.backward()
    zr = z.detach().clone().requires_grad_()
    ref = soft_target_cross_entropy_reference(zr, a, b, lam, mask, s)
    ref.backward()
    torch.testing.assert_close(loss.detach().cpu(), ref.detach(), atol=2e-5, rtol=1e-5)
    assert zt.grad.dtype == dtype
    torch.testing.assert_close(zt.grad.cpu(), zr.grad, **TOL[dtype])
    assert torch.equal(zt.grad, grad.to(dtype))  # the backward scales the forward's gradient by 1
    alone, none = ops.soft_target_ce(z.to(DEV), a.to(DEV), b.to(DEV), lam.to(DEV), mask.to(DEV), s, False)
    assert none.shape == (0,) and torch.equal(alone, loss.detach())


def test_soft_target_ce_upstream_gradient_and_errors():
    z = torch.randn(2, 11)
    a, b, lam = torch.tensor([1, 10]), torch.tensor([0, 10]), torch.tensor([0.25, 0.5])
    zt = z.to(DEV).requires_grad_()
    loss, _ = ops.soft_target_ce(zt, a.to(DEV), b.to(DEV), lam.to(DEV), None, 0.2, True)
    (loss * -3.0).backward()
    one_hot = torch.nn.functional.one_hot
    t = 0.8 * (lam[:, None] * one_hot(a, 11) + (1 - lam[:, None]) * one_hot(b, 11)) + 0.2 / 11
    torch.testing.assert_close(zt.grad.cpu(), -3.0 / 2 * (torch.softmax(z, -1) - t), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="float64"):
        ops.soft_target_ce(z.double().to(DEV), a.to(DEV), b.to(DEV), lam.to(DEV), None, 0.1, False)
    with pytest.raises(ValueError, match="mask must be"):
        ops.soft_target_ce(z.to(DEV), a.to(DEV), b.to(DEV), lam.to(DEV), torch.ones(3, device=DEV), 0.1, False)
    with pytest.raises(RuntimeError, match="with_grad=True"):
        ops.soft_target_ce(z.to(DEV).requires_grad_(), a.to(DEV), b.to(DEV), lam.to(DEV), None, 0.1, False)


def test_soft_target_ce_compiles_fullgraph_forward_and_backward():
    # the interpreter cannot run inside AOT tracing, so on the CPU this checks Dynamo capture (no graph
    # break, autograd through register_autograd); bench/gpu_kernels.py checks inductor on CUDA
    backend = "eager" if DEV.type == "cpu" else "inductor"
    z = torch.randn(4, 37, device=DEV)
    a, b = torch.tensor([0, 5, 36, 2], device=DEV), torch.tensor([1, 5, 0, 3], device=DEV)
    lam, mask = torch.rand(4, device=DEV), torch.tensor([1.0, 0.0, 1.0, 1.0], device=DEV)

    def loss_fn(x):
        loss, _ = ops.soft_target_ce(x, a, b, lam, mask, 0.1, True)
        return loss

    zc = z.clone().requires_grad_()
    torch.compile(loss_fn, fullgraph=True, backend=backend)(zc).backward()
    zr = z.clone().requires_grad_()
    soft_target_cross_entropy_reference(zr, a, b, lam, mask, 0.1).backward()
    torch.testing.assert_close(zc.grad, zr.grad, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------ meta / fake


def test_meta_device_calls():
    m = torch.device("meta")
    i64 = dict(dtype=torch.int64, device=m)
    prob, label, mask = ops.pseudo_label(torch.empty(4, 1000, dtype=torch.bfloat16, device=m), 0.5)
    assert prob.shape == (4,) and label.dtype == torch.int64 and mask.dtype == torch.float32 and prob.is_meta
    images = torch.empty(4, 3, 8, 8, dtype=torch.bfloat16, device=m)
    draws = (torch.empty(4, dtype=torch.bool, device=m), torch.empty(4, **i64), torch.empty(4, **i64),
             torch.empty(4, **i64))
    mixed, lam, mask = ops.pseudo_mixup(images, torch.empty(4, device=m), *draws, 0.5)
    assert mixed.shape == images.shape and mixed.dtype == torch.bfloat16 and lam.shape == mask.shape == (4,)
    mixed, lam = ops.mix_batch(images, torch.empty(4, device=m), *draws)
    assert mixed.is_meta and lam.dtype == torch.float32
    z = torch.empty(4, 21841, dtype=torch.bfloat16, device=m)
    loss, grad = ops.soft_target_ce(z, torch.empty(4, **i64), torch.empty(4, **i64), torch.empty(4, device=m),
                                    None, 0.1, True)
    assert loss.shape == () and grad.shape == z.shape and loss.dtype == grad.dtype == torch.float32
    assert ops.ema_update_([torch.empty(3, device=m)], [torch.empty(3, dtype=torch.bfloat16, device=m)], 0.9) is None


# ---------------------------------------------------------------------------------- bench script


def test_gpu_kernels_bench_smoke(tmp_path):
    from bench.gpu_kernels import main

    out = tmp_path / "kernels.json"
    report = main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == report["rows"]
    assert report["errors"] == [] and report["smoke"]
    ops_seen = {r["op"] for r in report["rows"]}
    assert ops_seen == {"ema_update_", "pseudo_mixup", "pseudo_label", "soft_target_ce fwd+bwd"}
    for row in report["rows"]:
        assert {"target", "meets_target", "gb_per_s", "copy_ratio"} <= row.keys()
        for key in ("max_abs_diff", "prob_max_abs_diff", "grad_max_abs_diff", "lam_max_abs_diff"):
            if key in row and row["dtype"] in ("float32", "float32 <- float32"):
                assert row[key] < 1e-5, row
        for key in ("sweep", "sweep_bwd"):
            assert all("error" not in entry for entry in row.get(key, [])), row[key]
        if row["op"] == "pseudo_mixup" and row["impl"] == "triton":
            assert row["cutmix_exact"] and row["mask_equal"]
    assert all(v["ok"] for k, v in report["compile"].items() if isinstance(v, dict))
    assert sum("sweep" in row for row in report["rows"]) >= 4  # the sweep code ran (first setting only)


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None, reason="no NVIDIA Triton backend")
def test_kernels_compile_for_sm90_without_a_gpu():
    """Compile every kernel for sm_90 (no GPU needed): the GPU run must not fail on a compile error, and
    the hot paths must use 16-byte vector loads and IEEE division / sqrt for the box arithmetic."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_kernels", "--ptx"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ptx = json.loads(proc.stdout)
    if "skipped" in ptx:
        pytest.skip(ptx["skipped"])
    for kernel in ("ema_fp32_bf16", "mixup_bf16_224", "pseudo_label_bf16", "soft_ce_fwd_fp32", "soft_ce_grad_bf16"):
        assert ptx[kernel].get("ld.global.v4.b32", 0) >= 1, (kernel, ptx[kernel])
    assert ptx["ema_fp32_bf16"].get("st.global.v4.b32", 0) >= 1
    assert ptx["mixup_bf16_224"].get("sqrt.rn.f64") == 1 and ptx["mixup_bf16_224"].get("div.rn.f32") == 1
