"""Where and how the run executes: device, precision, processes (torchrun), seeds."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import kernels
from engine.config import DistConfig, RunConfig
from engine.errors import UserError, WriteError


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None = full precision
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_process_group: bool = False  # setup_runtime created it (so shutdown destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def shutdown(self) -> None:
        """Tear the process group down before the interpreter exits. Left to the exit handlers, gloo's
        worker threads were destroyed while still running in some runs (a rank aborting with "terminate
        called without an active exception" after its work was done, ~1 run in 20 on a loaded CPU)."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()

    def main_only(self, write) -> None:
        """Run `write` (a checkpoint) on rank 0 and let every rank agree on whether it worked: a full disk
        stops all ranks with one error instead of leaving the others waiting in their next collective.
        The all-reduce is also the barrier: no rank moves on before the file is complete."""
        error = None
        if self.is_main:
            try:
                write()
            except UserError as err:
                error = err
        if self.distributed:
            failed = torch.tensor(float(error is not None), device=self.device)
            dist.all_reduce(failed)
            if failed.item() > 0 and error is None:  # a save step, not the training step: one sync is fine
                raise WriteError("rank 0 could not write a checkpoint (its message says why); resume with "
                                 "--checkpoint.resume auto once it is fixed")
        if error is not None:
            raise error

    def all_rng_states(self) -> list[dict]:
        """Every rank's RNG states (rank order), so that each rank resumes its own random draws."""
        state = rng_state()
        if not self.distributed:
            return [state]
        states: list = [None] * self.world_size
        dist.all_gather_object(states, state)
        return states


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) when run directly."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def setup_runtime(run: RunConfig, dist_cfg: DistConfig) -> Runtime:
    rank, world, local = env_world()
    if run.device == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device = 'cuda' but no CUDA device is visible: use --run.device cpu (or auto)")
    use_cuda = run.device == "cuda" or (run.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if run.precision == "bf16" or (run.precision == "auto" and use_cuda):
        dtype = torch.bfloat16
    else:
        dtype = None
    if run.threads:
        torch.set_num_threads(run.threads)
    select_kernels(run.kernels, device)
    owns = world > 1 and not dist.is_initialized()
    if owns:
        backend = dist_cfg.backend if dist_cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
        dist.init_process_group(backend=backend, device_id=device if use_cuda else None)
    return Runtime(device=device, dtype=dtype, rank=rank, world_size=world, local_rank=local,
                   owns_process_group=owns)


def select_kernels(backend: str, device: torch.device) -> None:
    """Make `run.kernels` the default of every fused op; an explicit backend that cannot run here
    stops the run before anything trains (auto always runs: it falls back to torch)."""
    kernels.dispatch.set_default(backend)
    try:
        kernels.dispatch.resolve(backend, device)
    except kernels.KernelUnavailable as err:
        raise UserError(f"run.kernels: {err}") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """All RNG states as tensors and ints, so a checkpoint loads with weights_only=True."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(saved, rank: int, world_size: int, reseed: int) -> bool:
    """Each rank takes back its own saved RNG states; False (and a fresh seed per rank) when the checkpoint
    was written by another number of ranks, where the old per-rank streams cannot be mapped one to one."""
    states = [saved] if isinstance(saved, dict) else list(saved)  # a dict: written by an older version
    if len(states) == world_size:
        set_rng_state(states[rank])
        return True
    seed_everything(reseed + 1000 * rank)
    return False


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate((state["python_version"], tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
