"""Where and how the run executes: device, precision, processes (torchrun), seeds."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

import kernels
from engine import host_memory
from engine.config import DistConfig, RunConfig
from engine.errors import RankFailure, UserError, WriteError


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None = full precision
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_process_group: bool = False  # setup_runtime created it (so shutdown destroys it)
    timeout_s: float = 600.0  # dist.timeout_s: how long any collective waits for the other ranks

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

    def collective(self, what: str) -> Collective:
        """`with rt.collective("the gradient all-reduce of step 7"):` names the collectives run inside, so
        that a timeout or a lost rank stops this rank with one line saying which one and what to check."""
        return Collective(self, what)

    def all_reduce_sum(self, t: torch.Tensor, what: str = "the all-reduce of metrics or evaluation totals"
                       ) -> torch.Tensor:
        if self.distributed:
            with self.collective(what):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self, what: str = "a barrier (the ranks waiting for rank 0's files)") -> None:
        if self.distributed:
            with self.collective(what):
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
            with self.collective("the all-reduce after rank 0's checkpoint write (the other ranks wait for it)"):
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
        with self.collective("the gather of every rank's RNG states for a checkpoint"):
            dist.all_gather_object(states, state)
        return states


class Collective:
    """Turns gloo's and NCCL's transport errors inside it into a RankFailure naming the collective: a
    timeout (another rank hung) or a closed connection (another rank died). The innermost one names it;
    anything else passes through untouched. Entering and leaving cost no communication and no sync."""

    def __init__(self, rt: Runtime, what: str):
        self.rt, self.what = rt, what

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or not self.rt.distributed or not isinstance(exc, RuntimeError):
            return False  # RuntimeError: what gloo and NCCL raise (DistBackendError and DistStoreError are ones)
        message = rank_failure_message(str(exc), self.what, self.rt.rank, self.rt.timeout_s)
        if message is None:
            return False
        raise RankFailure(message) from exc


# What gloo, NCCL and the rendezvous store say when another rank is gone (checked first: gloo's "timed out
# connecting: Connection refused" is one), or does not answer in time.
PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused",
             "socket closed")
TIMED_OUT = ("timed out", "timeout")
RESUME = "the last checkpoint is intact: rerun with --checkpoint.resume auto (torchrun --max-restarts N does it)"


def rank_failure_message(error: str, what: str, rank: int, timeout_s: float) -> str | None:
    """One line for a collective that timed out or lost a rank; None for any other error."""
    text = error.lower()
    if "connection refused" in text:
        return (f"rank {rank}: could not reach another rank during {what} (connection refused: it is gone, not "
                f"started, or a firewall blocks the port): check every rank's log and node; {RESUME}")
    if any(s in text for s in PEER_GONE):
        return (f"rank {rank}: another rank left during {what} (its process died: killed, out of memory, or its "
                f"node failed): check that rank's log and the node; {RESUME}")
    if any(s in text for s in TIMED_OUT):
        return (f"rank {rank}: {what} timed out after {timeout_s:g} s (dist.timeout_s): another rank stopped "
                f"answering. Check the other ranks' logs for the one that hung (a stuck data loader or file system, "
                f"a GPU error, a dead node); if this wait is legitimately longer (a slow checkpoint disk, a first "
                f"compile), raise --dist.timeout_s; {RESUME}")
    return None


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
    host_memory.apply(run.host_memory, on_cpu=not use_cuda)
    select_kernels(run.kernels, device)
    owns = world > 1 and not dist.is_initialized()
    if owns:
        backend = dist_cfg.backend if dist_cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
        probe = Runtime(device=device, dtype=None, rank=rank, world_size=world, timeout_s=dist_cfg.timeout_s)
        timeout = timedelta(seconds=dist_cfg.timeout_s)
        with probe.collective("the process group set-up (every rank meeting at MASTER_ADDR:MASTER_PORT)"):
            dist.init_process_group(backend=backend, device_id=device if use_cuda else None, timeout=timeout,
                                    store=attempt_store(rank, world, timeout), rank=rank, world_size=world)
    return Runtime(device=device, dtype=dtype, rank=rank, world_size=world, local_rank=local,
                   owns_process_group=owns, timeout_s=dist_cfg.timeout_s)


def attempt_store(rank: int, world: int, timeout: timedelta) -> dist.Store:
    """The rendezvous store (MASTER_ADDR:MASTER_PORT), under a prefix of torchrun's restart count.

    torchrun keeps one store for all the attempts of `--max-restarts`, so a restarted group would find the
    dead ranks' addresses from the attempt before still there: gloo's ranks then connect to ports nobody
    listens on ("Connection refused") and the restart fails. A prefix per attempt gives each its own keys."""
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    return dist.PrefixStore(f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


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
