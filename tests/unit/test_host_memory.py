"""run.host_memory: "keep" makes glibc's malloc serve large blocks from its heap (reused step after step)
instead of a fresh mapping per allocation; "system", and "auto" off the CPU, leave malloc alone. malloc's
setting is per process and cannot be undone, so each case runs in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine import host_memory

ROOT = Path(__file__).resolve().parents[2]
# How many blocks malloc has mapped (mallinfo2's hblks) grows by one when a 4 MiB block gets its own mapping.
MAPPED_BLOCKS_OF_A_4_MIB_MALLOC = """
import ctypes, sys
from engine import host_memory
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = Info, ctypes.c_void_p, [ctypes.c_void_p]
kept = host_memory.apply(sys.argv[1], on_cpu=sys.argv[2] == "cpu")
before = libc.mallinfo2().hblks
block = libc.malloc(4 << 20)
print(kept, libc.mallinfo2().hblks - before)
libc.free(block)
"""

needs_glibc = pytest.mark.skipif(host_memory._mallopt() is None, reason="malloc is not glibc's")


def mapped_blocks(mode: str, device: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", MAPPED_BLOCKS_OF_A_4_MIB_MALLOC, mode, device], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout.split()
    return out[0], int(out[1])


@needs_glibc
@pytest.mark.parametrize("mode", ["keep", "auto"])
def test_keep_serves_a_4_mib_block_from_the_heap_on_a_cpu_run(mode):
    assert mapped_blocks(mode, "cpu") == ("True", 0)


@needs_glibc
@pytest.mark.parametrize("mode, device", [("system", "cpu"), ("auto", "cuda")])
def test_system_and_auto_off_the_cpu_leave_malloc_mapping_large_blocks(mode, device):
    assert mapped_blocks(mode, device) == ("False", 1)


def test_the_runtime_applies_the_runs_setting_for_a_cpu_run(monkeypatch):
    from engine.config import load_plan
    from engine.runtime import setup_runtime

    calls = []
    monkeypatch.setattr(host_memory, "apply", lambda mode, on_cpu: calls.append((mode, on_cpu)))
    plan = load_plan(ROOT / "configs" / "digits.toml", [("run.device", "cpu"), ("run.host_memory", "system")])
    setup_runtime(plan.base.run, plan.base.dist)
    assert calls == [("system", True)]
