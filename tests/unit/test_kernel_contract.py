"""The operator contract (kernels/contract.py): the schemas each backend registers equal the table,
the ops pass torch's opcheck, run on the meta device and compile with fullgraph."""

from __future__ import annotations

import re

import pytest
import torch
from kernel_cases import border_draws, ce_inputs, gen

from kernels import contract, triton_ops


@pytest.mark.parametrize("namespace", ["semivit_native", "semivit_triton"])
def test_each_backend_registers_the_schemas_of_the_table(namespace, request):
    request.getfixturevalue("native_ops" if namespace == "semivit_native" else "triton_ns")
    expected = {name for name, op in contract.OPS.items() if namespace in op.namespaces}
    for name in expected:
        assert hasattr(getattr(torch.ops, namespace), name), name
        got = getattr(getattr(torch.ops, namespace), name).default._schema
        want = torch._C.parse_schema(f"{namespace}::{name}{contract.SCHEMAS[name]}")
        # some torch releases (2.11) drop the result names of a triton_op; the native library keeps them
        names = namespace == "semivit_native" or any(r.name for r in got.returns)
        assert _parts(got, names) == _parts(want, names), name


def _parts(schema, result_names: bool) -> tuple[str, str]:
    """(name and arguments, results) as the schema prints them; results without names if asked."""
    arguments, results = str(schema).split(" -> ", 1)
    return arguments, results if result_names else re.sub(r"(Tensor\??) \w+", r"\1", results)


def test_the_table_names_every_op_of_the_dispatcher():
    assert set(contract.OPS) >= {"ema_update_", "pseudo_label", "pseudo_mixup", "mix_batch", "soft_target_ce"}
    assert set(triton_ops.OPS) == {n for n, op in contract.OPS.items() if "semivit_triton" in op.namespaces}


# ------------------------------------------------------------------------------------ Triton ops


def test_triton_status_and_registration(triton_ns):
    assert triton_ops.available()
    line = triton_ops.status()
    assert line.startswith("triton ") and "\n" not in line
    for name in triton_ops.OPS:
        assert hasattr(triton_ns, name), name



def test_triton_meta_device_calls(triton_ns):
    m = torch.device("meta")
    i64 = dict(dtype=torch.int64, device=m)
    prob, label, mask = triton_ns.pseudo_label(torch.empty(4, 1000, dtype=torch.bfloat16, device=m), 0.5)
    assert prob.shape == (4,) and label.dtype == torch.int64 and mask.dtype == torch.float32 and prob.is_meta
    images = torch.empty(4, 3, 8, 8, dtype=torch.bfloat16, device=m)
    draws = (torch.empty(4, dtype=torch.bool, device=m), torch.empty(4, **i64), torch.empty(4, **i64),
             torch.empty(4, **i64))
    mixed, lam, mask = triton_ns.pseudo_mixup(images, torch.empty(4, device=m), *draws, 0.5)
    assert mixed.shape == images.shape and mixed.dtype == torch.bfloat16 and lam.shape == mask.shape == (4,)
    mixed, lam = triton_ns.mix_batch(images, torch.empty(4, device=m), *draws)
    assert mixed.is_meta and lam.dtype == torch.float32
    z = torch.empty(4, 21841, dtype=torch.bfloat16, device=m)
    loss, grad = triton_ns.soft_target_ce(z, torch.empty(4, **i64), torch.empty(4, **i64), torch.empty(4, device=m),
                                    None, 0.1, True)
    assert loss.shape == () and grad.shape == z.shape and loss.dtype == grad.dtype == torch.float32
    student = [torch.empty(3, dtype=torch.bfloat16, device=m)]
    assert triton_ns.ema_update_([torch.empty(3, device=m)], student, 0.9) is None



# ------------------------------------------------------------------------------------ native ops


def _op_samples():
    g = gen(12)
    B, H, W = 4, 13, 17
    images = torch.randn(B, 3, H, W, generator=g)
    draws = border_draws(B, H, W, seed=13)
    logits, label_a, label_b, lam = ce_inputs(B, 7, torch.float64, seed=14)
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
def test_native_opcheck(native_ops, name):
    args = dict(_op_samples())[name]
    torch.library.opcheck(getattr(native_ops, name).default, args)


def test_native_meta_device(native_ops):
    m = torch.device("meta")
    B, H, W = 4, 13, 17
    prob, label, mask = native_ops.pseudo_label(torch.empty(B, 10, device=m, dtype=torch.bfloat16), 0.5)
    assert prob.device == m and prob.shape == (B,) and label.dtype == torch.int64 and mask.dtype == torch.float32
    images = torch.empty(B, 3, H, W, device=m, dtype=torch.bfloat16)
    draws = [t.to(m) for t in border_draws(B, H, W, seed=1)]
    out, lam, mask = native_ops.pseudo_mixup(images, torch.empty(B, device=m), *draws, 0.5)
    assert out.shape == images.shape and out.dtype == torch.bfloat16 and lam.shape == mask.shape == (B,)
    out, lam = native_ops.mix_batch(images, torch.empty(B, device=m), *draws)
    assert out.shape == images.shape and lam.dtype == torch.float32
    lam, mask = native_ops.pseudo_mixup_(images, torch.empty(B, device=m), *draws, 0.5)
    assert lam.is_meta and lam.shape == mask.shape == (B,)
    assert native_ops.mix_batch_(images, torch.empty(B, device=m), *draws).shape == (B,)
    z = torch.empty(B, 10, device=m, dtype=torch.float64, requires_grad=True)
    labels = torch.zeros(B, dtype=torch.long, device=m)
    loss, grad = native_ops.soft_target_ce(z, labels, labels, torch.empty(B, device=m), None, 0.1, True)
    assert loss.dtype == grad.dtype == torch.float64 and loss.shape == () and grad.shape == (B, 10)
    loss.backward()
    assert z.grad.shape == z.shape and z.grad.device == m
    t = [torch.empty(3, device=m)]
    native_ops.ema_update_(t, [torch.empty(3, device=m)], 0.9)


def test_native_compile_fullgraph_soft_target_ce(native_ops):
    logits, label_a, label_b, lam = ce_inputs(4, 7, torch.float32, seed=15)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0])

    def loss_fn(z, a, b, w, m):
        loss, _ = torch.ops.semivit_native.soft_target_ce(z, a, b, w, m, 0.1, True)
        return loss

    # dynamo + AOTAutograd through the fake impl and autograd (inductor would only add compile time)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    z1 = logits.clone().requires_grad_()
    z2 = logits.clone().requires_grad_()
    out = compiled(z1, label_a, label_b, lam, mask)
    out.backward()
    ref = loss_fn(z2, label_a, label_b, lam, mask)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(z1.grad, z2.grad)
