"""One dispatch for every fused op: backend choice, errors, agreement across backends, the trainer's use.

The op-level comparisons against the references live in the tests/unit/test_op_*.py files; here every
backend is reached through the public functions, as the trainer reaches them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import impl_device, require_backend
from kernel_cases import gen as _gen
from test_op_ema import _net
from test_op_pseudo_mixup import _mix_inputs
from torch.overrides import TorchFunctionMode

import kernels
from kernels import (
    dispatch,
    draw_mix_randomness,
    ema_tensors,
    ema_update,
    labelled_mixup,
    mix_batch,
    native,
    pseudo_label,
    pseudo_mixup,
    pseudo_mixup_reference,
    soft_target_cross_entropy,
    triton_ops,
)

ROOT = Path(__file__).resolve().parents[2]
FUSED = ("native", "triton")


# ------------------------------------------------------------------------------------- resolution


def test_auto_picks_native_on_cpu_when_built_else_torch(monkeypatch):
    cpu = torch.device("cpu")
    expected = "native" if native.load() else "torch"
    assert dispatch.resolve("auto", cpu) == expected
    monkeypatch.setattr(native, "load", lambda: False)
    assert dispatch.resolve("auto", cpu) == "torch"
    assert dispatch.resolve("torch", cpu) == "torch" and dispatch.resolve("reference", cpu) == "reference"


def test_auto_on_cuda_prefers_triton_and_routes_float64_elsewhere(monkeypatch):
    monkeypatch.setattr(triton_ops, "available", lambda: True)
    monkeypatch.setattr(triton_ops, "load", lambda: True)
    cuda = torch.device("cuda")
    assert dispatch.resolve("auto", cuda, torch.bfloat16) == "triton"
    assert dispatch.resolve("auto", cuda, torch.float64) == "torch"  # Triton kernels compute in float32
    with pytest.raises(kernels.KernelUnavailable, match="float64"):
        dispatch.resolve("triton", cuda, torch.float64)
    with pytest.raises(kernels.KernelUnavailable, match="CPU ops"):
        dispatch.resolve("native", cuda)


def test_explicit_backend_that_cannot_run_names_the_fix(monkeypatch):
    monkeypatch.setattr(native, "load", lambda: False)
    monkeypatch.setattr(native, "status", lambda: "native: not built — run: cmake -S . -B build")
    with pytest.raises(kernels.KernelUnavailable, match="cmake -S . -B build"):
        pseudo_label(torch.randn(2, 3), 0.5, backend="native")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(kernels.KernelUnavailable, match="TRITON_INTERPRET"):
        pseudo_label(torch.randn(2, 3), 0.5, backend="triton")
    with pytest.raises(ValueError, match="unknown kernels backend 'fast'"):
        pseudo_label(torch.randn(2, 3), 0.5, backend="fast")


def test_default_backend_follows_set_default():
    logits = torch.randn(4, 7)
    dispatch.set_default("reference")
    assert dispatch.get_default() == "reference"
    assert dispatch.describe("cpu") == "reference -> reference (run.kernels = 'reference')"
    for a, b in zip(pseudo_label(logits, 0.3), kernels.pseudo_label_reference(logits, 0.3)):
        assert torch.equal(a, b)


# -------------------------------------------------------------------------- agreement across backends


@pytest.mark.parametrize("backend", FUSED)
def test_same_seed_gives_the_same_mixed_batch_on_every_backend(backend):
    require_backend(backend)
    dev = impl_device(backend)
    B, C, H, W = 6, 3, 13, 17
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(B, C, H, W, generator=gen)
    prob = torch.rand(B, generator=gen)
    prob[:2] = 0.0  # a pair may have two zero confidences: lam 0.5, no NaN
    label = torch.randint(0, 10, (B,), generator=gen)
    outs = {}
    for name in ("reference", "torch", backend):
        draws = draw_mix_randomness(B, H, W, 0.5, "cpu", torch.Generator().manual_seed(11))
        on = dev if name == backend else torch.device("cpu")
        got = pseudo_mixup(images.to(on), prob.to(on), label.to(on), 0.4, backend=name,
                           draws=kernels.MixDraws(*(t.to(on) for t in draws)))
        outs[name] = kernels.MixedBatch(*(t.cpu() for t in got))
    ref = outs["reference"]
    for name in ("torch", backend):
        got = outs[name]
        assert torch.equal(got.label_b, ref.label_b) and torch.equal(got.mask, ref.mask)
        torch.testing.assert_close(got.lam, ref.lam, rtol=0, atol=1e-7)
        torch.testing.assert_close(got.images, ref.images, rtol=1e-6, atol=1e-6)
        assert not got.lam.isnan().any()
    cut = draws.use_cutmix  # box pixels are copies: exact on every backend
    assert torch.equal(outs[backend].images[cut], ref.images[cut])


@pytest.mark.parametrize("backend", FUSED)
def test_labelled_mixup_and_losses_agree_with_torch(backend):
    require_backend(backend)
    dev = impl_device(backend)
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randn(4, 3, 9, 11, generator=gen), torch.randint(0, 5, (4,), generator=gen)
    a = labelled_mixup(images.to(dev), labels.to(dev), generator=torch.Generator(dev).manual_seed(5), backend="torch")
    b = labelled_mixup(images.to(dev), labels.to(dev), generator=torch.Generator(dev).manual_seed(5), backend=backend)
    torch.testing.assert_close(b.images, a.images, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.lam, a.lam)

    logits = torch.randn(6, 21, generator=gen).to(dev).requires_grad_()
    la, lb = torch.randint(0, 21, (6,), generator=gen).to(dev), torch.randint(0, 21, (6,), generator=gen).to(dev)
    lam, mask = torch.rand(6, generator=gen).to(dev), (torch.rand(6, generator=gen) > 0.3).float().to(dev)
    losses, grads = [], []
    for name in ("torch", backend):
        loss = soft_target_cross_entropy(logits, la, lb, lam, mask, smoothing=0.1, backend=name)
        (grad,) = torch.autograd.grad(loss, logits)
        losses.append(loss.detach())
        grads.append(grad)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)

    z = torch.randn(5, 1000, generator=gen).to(dev)
    for x, y in zip(pseudo_label(z, 0.002, backend=backend), pseudo_label(z, 0.002, backend="torch")):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", FUSED)
def test_ema_through_dispatch_handles_integer_state_and_bf16_students(backend):
    require_backend(backend)
    dev = impl_device(backend)
    gen = torch.Generator().manual_seed(1)
    shapes = [(3, 5), (7,), (1,), (2, 3, 4)]
    teacher = [t.to(dev) for t in [torch.randn(s, generator=gen) for s in shapes] + [torch.tensor(4)]]
    student = [t.to(dev) for t in [torch.randn(s, generator=gen).bfloat16() for s in shapes] + [torch.tensor(9)]]
    expected = [t.clone() for t in teacher]
    kernels.ema_update_reference(expected, student, 0.9)
    ema_update(teacher, student, 0.9, backend=backend)
    for t, e in zip(teacher, expected):
        torch.testing.assert_close(t, e, rtol=1e-6, atol=1e-6)
    assert teacher[-1].item() == 9  # integer state copied


def test_flatten_into_buffers_keeps_values_and_ties_and_the_ema_follows():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    net[2].weight = torch.nn.Parameter(net[0].weight.detach().t().clone())
    net[0].weight = net[2].weight  # tied (shapes differ in use, the tie is what matters)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    teacher = kernels.flatten_into_buffers(net)
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert net[0].weight is net[2].weight
    assert all(t.is_floating_point() for t in teacher)  # what ema_tensors returns: floats only
    base = teacher[0].untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == base for t in teacher)  # one buffer
    ema_update(teacher, [t + 1 for t in teacher], 0.5)
    assert torch.equal(net[1].running_var, before["1.running_var"] + 0.5)  # the module sees the update


def test_meta_tensors_flow_through_the_dispatch():
    """--dry-run builds on the meta device: each public op must give shapes there, whatever 'auto' picks."""
    with torch.device("meta"):
        logits = torch.empty(8, 1000)
        images = torch.empty(8, 3, 32, 32)
        prob, label, mask = pseudo_label(logits, 0.7)
        draws = draw_mix_randomness(8, 32, 32, 0.5, "meta")
        mixed = pseudo_mixup(images, prob, label, 0.7, draws=draws)
        loss = soft_target_cross_entropy(logits, mixed.label_a, mixed.label_b, mixed.lam, mixed.mask)
    assert mixed.images.shape == images.shape and mixed.images.device.type == "meta"
    assert prob.shape == (8,) and label.dtype == torch.int64 and loss.shape == ()


# ---------------------------------------------------------------------------------- the trainer


def test_run_kernels_config_key_is_validated_and_applied(monkeypatch):
    from engine.config import load_plan
    from engine.errors import ConfigError, UserError
    from engine.runtime import setup_runtime

    demo = ROOT / "configs" / "digits.toml"
    with pytest.raises(ConfigError, match="run.kernels"):
        load_plan(demo, [("run.kernels", "fastest")])
    plan = load_plan(demo, [("run.kernels", "torch")])
    setup_runtime(plan.base.run, plan.base.dist)
    assert dispatch.get_default() == "torch"
    monkeypatch.setattr(native, "load", lambda: False)
    plan = load_plan(demo, [("run.kernels", "native")])
    with pytest.raises(UserError, match="run.kernels: kernels backend 'native' cannot run"):
        setup_runtime(plan.base.run, plan.base.dist)


class _LossSink:
    """Stands in for the metric logger: keeps the step's loss."""

    def accumulate(self, metrics, images, data_wait=0.0):
        self.sums = {"loss": metrics["loss"]}


def test_one_semi_step_gives_the_same_loss_and_teacher_with_torch_and_native():
    require_backend("native")
    from engine.config import load_plan
    from engine.runtime import Runtime
    from engine.stages.standalone import stage_steps

    demo = ROOT / "configs" / "digits.toml"
    plan = load_plan(demo, [("run.stages", "semi"), ("logging.progress", "false"), ("semi.threshold", "0.1")])
    cfg = plan.stages["semi"]
    rt = Runtime(device=torch.device("cpu"), dtype=None)
    results = {}
    for backend in ("torch", "native"):
        dispatch.set_default(backend)
        torch.manual_seed(0)
        logger = _LossSink()
        step = stage_steps(cfg, "semi", rt, logger=logger)
        torch.manual_seed(1)  # the same augmentation, dropout and mixup draws for both backends
        step()
        stage = step.stage
        results[backend] = (logger.sums["loss"].clone(), {k: v.clone() for k, v in stage.teacher.state_dict().items()})
    loss_t, teacher_t = results["torch"]
    loss_n, teacher_n = results["native"]
    torch.testing.assert_close(loss_n, loss_t, rtol=1e-5, atol=1e-6)
    for key in teacher_t:
        torch.testing.assert_close(teacher_n[key], teacher_t[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("donate", [False, True])
def test_semi_loss_compiles_without_graph_breaks_on_the_native_ops(donate):
    """pseudo label -> pseudo mixup -> student -> soft CE, forward and backward, one graph (fullgraph);
    with a donated batch the in-place op is functionalised by the compiler and still writes the input."""
    require_backend("native")
    torch._dynamo.reset()
    head = torch.nn.Linear(3 * 8 * 8, 10)

    def semi_loss(teacher_logits, strong, use_cutmix, cy, cx, partner):
        prob, label, _ = pseudo_label(teacher_logits, 0.2)
        draws = kernels.MixDraws(use_cutmix, cy, cx, partner)
        mixed = pseudo_mixup(strong, prob, label, 0.2, draws=draws, donate=donate)
        logits = head(mixed.images.flatten(1))
        return soft_target_cross_entropy(logits, mixed.label_a, mixed.label_b, mixed.lam, mixed.mask)

    gen = torch.Generator().manual_seed(0)
    logits, strong = torch.randn(4, 10, generator=gen), torch.randn(4, 3, 8, 8, generator=gen)
    draws = draw_mix_randomness(4, 8, 8, 0.5, "cpu", gen)
    compiled = torch.compile(semi_loss, fullgraph=True, backend="aot_eager")
    given = strong.clone()
    loss = compiled(logits, given, *draws)
    loss.backward()
    eager = strong.clone()
    expected = semi_loss(logits, eager, *draws)
    torch.testing.assert_close(loss, expected)
    assert torch.equal(given, eager) and torch.equal(given, strong) != donate  # mixed in place iff donated
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()


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


@pytest.mark.usefixtures("kernels_backend")
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


@pytest.mark.usefixtures("kernels_backend")
def test_pseudo_mixup_ignores_autocast():
    images, prob, label = _mix_inputs()
    d = draw_mix_randomness(6, 7, 5, 0.5, "cpu", _gen(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pseudo_mixup(images, prob, label, 0.5, draws=d)
    ref = pseudo_mixup_reference(images, prob, label, 0.5, draws=d)
    assert out.images.dtype == torch.float32
    torch.testing.assert_close(out.images, ref.images, rtol=0, atol=1e-6)


# start-up


def test_the_constant_mark_is_what_torch_compilers_own_decorator_sets():
    ours, theirs = dispatch.constant_while_tracing(lambda: 0), torch.compiler.assume_constant_result(lambda: 0)
    assert vars(ours) == vars(theirs) == {"_dynamo_marked_constant": True}


def test_starting_the_trainer_imports_neither_the_compiler_nor_matplotlib():
    """torch._dynamo (~2 s) and matplotlib (~1 s) load only when a run compiles or draws its plots."""
    code = "import sys, engine.train; print(sorted(m for m in ('torch._dynamo', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"
