"""FSDP2 (`dist.strategy = "fsdp"`): parameters, gradients, optimizer state and the EMA teacher sharded
across ranks, one `fully_shard` per transformer block, then the root.

The teacher is sharded exactly like the student, so each rank's EMA update reads and writes only its own
shard (kernels.ema_update on the local tensors of the DTensors: no communication). On a GPU with bf16
the policy keeps fp32 sharded parameters, all-gathers and computes in bf16, reduces gradients in fp32.
Checkpoints of sharded runs go through torch.distributed.checkpoint (engine.checkpoint.save_sharded).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from engine.runtime import Runtime


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(module, "_orig_mod", module), FSDPModule)


def shard_module(module: nn.Module, rt: Runtime) -> nn.Module:
    """fully_shard every block (encoder and, for MAE, decoder), then the root; in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(rt.device.type, (rt.world_size,))
    if rt.device.type == "cuda" and rt.dtype == torch.bfloat16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for name in ("blocks", "decoder_blocks"):
        for block in getattr(module, name, []):
            fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)
    return module


def local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's shard of each DTensor (sharing its storage); plain tensors as they are."""
    from torch.distributed.tensor import DTensor

    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def replicated(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (e.g. the global gradient norm), a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def _fsdp_accumulate(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def skip_gradient_sync(forward_model: nn.Module):
    """A non-final micro-step of gradient accumulation: no all-reduce (DDP) or reduce-scatter (FSDP2)."""
    module = getattr(forward_model, "_orig_mod", forward_model)  # under torch.compile
    if hasattr(module, "no_sync"):
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):
        return _fsdp_accumulate(module)
    return contextlib.nullcontext()


def full_state_dict(module: nn.Module) -> dict:
    """Unsharded weights on the CPU, on every rank (a collective under FSDP2): final and best checkpoints,
    the next stage's start."""
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu() for k, v in full.items()}
