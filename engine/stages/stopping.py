"""SIGTERM/SIGINT: finish the current step, agree across ranks on when to stop, save, exit (code 3).

The ranks must stop after the same step, or their checkpoints would not fit together. Each step every
rank starts an asynchronous all-reduce of its own flag on a CPU (gloo) group and reads the result of the
previous step's one, so all ranks stop one step after the first signal, without a device sync and
without waiting for a logging step. A single process stops right after the step it was signalled in.
"""

from __future__ import annotations

import contextlib
import signal
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.errors import Interrupted, UserError
from engine.runtime import Runtime


class StopFlag:
    """Turns SIGTERM/SIGINT into a flag checked between steps; a second signal interrupts at once."""

    def __init__(self):
        self.raised = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave handlers alone
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.raised:  # second signal: the user insists
            raise KeyboardInterrupt
        self.raised = True
        print(f"\nsignal {signum}: finishing the current step, saving a checkpoint, then exiting", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class StopVote:
    """`poll(local)` once per step on every rank: True on all ranks at the same step once any rank voted."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.pending: tuple | None = None
        self.group = None
        if rt.distributed:  # a CPU group of its own: its messages never wait behind the device's work
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=rt.timeout_s))

    def poll(self, local: bool) -> bool:
        if not self.rt.distributed:
            return local
        decided = self._collect()
        flag = torch.tensor([float(local)])  # on the CPU: reading it back later is no device sync
        self.pending = (dist.all_reduce(flag, group=self.group, async_op=True), flag)
        return decided

    def _collect(self) -> bool:
        if self.pending is None:
            return False
        work, flag = self.pending
        self.pending = None
        with self.rt.collective("the stop vote (the ranks' per-step SIGTERM/SIGINT agreement)"):
            work.wait()
        return flag.item() > 0

    def close(self) -> None:
        """Complete the last vote (every rank started it) before the group is left behind."""
        self._collect()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # After an error every rank raised at the same step (a signal, a non-finite stop, a failed write) the
        # others complete the vote too; after any other error (a lost or hung rank) waiting could only fail
        # again, or wait dist.timeout_s more, and hide the first error.
        if exc_type is None or issubclass(exc_type, (Interrupted, UserError)):
            self.close()
