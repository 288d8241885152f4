"""Test-wide setup.

Without a CUDA device the Triton kernels run on CPU tensors in Triton's interpreter, which is chosen
when a kernel is decorated, so the variable is set before anything imports Triton (importing torch
does not). With a CUDA device the Triton tests run the compiled kernels on CUDA tensors
(``impl_device``). The fused-op default backend is process state (the trainer sets it from
run.kernels): each test starts from "auto".
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import kernels.dispatch  # noqa: E402


@pytest.fixture(autouse=True)
def _kernels_default_auto():
    kernels.dispatch.set_default("auto")
    yield
    kernels.dispatch.set_default("auto")


def require_backend(name: str) -> None:
    """The native and Triton backends fail their tests in CI (which builds and installs both) and
    skip elsewhere, with the reason (e.g. the build command)."""
    from kernels import native, triton_ops

    module = {"native": native, "triton": triton_ops}.get(name)
    if module is not None and not module.load():
        if os.environ.get("CI"):
            pytest.fail(f"{name} kernels unavailable in CI: {module.status()}")
        pytest.skip(module.status())


def impl_device(impl: str) -> torch.device:
    """Where a test puts the tensors for an implementation: CUDA for Triton unless it is interpreted,
    the CPU for the others (native, torch, reference)."""
    from kernels import triton_ops

    if impl == "triton" and not triton_ops.interpreted():
        return torch.device("cuda")
    return torch.device("cpu")


def require_dali() -> None:
    """DALI tests fail in CI (.ci/run installs the wheel) and skip elsewhere, saying how to install it."""
    from dataloading import dali

    if not dali.available():
        if os.environ.get("CI"):
            pytest.fail(f"NVIDIA DALI unavailable in CI: {dali.INSTALL}")
        pytest.skip(f"NVIDIA DALI not installed: {dali.INSTALL}")


@pytest.fixture(params=["torch", "native", "triton"])
def kernels_backend(request):
    """Run a test once per implementation, each reached through the public functions' default."""
    require_backend(request.param)
    if impl_device(request.param).type != "cpu":
        pytest.skip("these tests build CPU tensors; the Triton kernels on CUDA are tested by test_triton_ops.py")
    kernels.dispatch.set_default(request.param)
    yield request.param


@pytest.fixture(params=["reference", "torch", "native", "triton"])
def impl(request):
    """One implementation per run, called explicitly (``backend=impl``) on ``impl_device(impl)``."""
    require_backend(request.param)
    return request.param


@pytest.fixture
def triton_ns():
    """``torch.ops.semivit_triton``; skips without Triton (fails under CI). Tensors: ``impl_device("triton")``."""
    require_backend("triton")
    return torch.ops.semivit_triton


@pytest.fixture
def native_ops():
    """``torch.ops.semivit_native``; skips when the library is not built (fails under CI)."""
    require_backend("native")
    return torch.ops.semivit_native


@pytest.fixture
def one_thread():
    """Training tests run on one torch thread: steadier on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
