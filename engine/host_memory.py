"""run.host_memory: keep freed CPU tensor memory in the process instead of handing it back to the OS.

glibc's malloc serves a large allocation (above a threshold that starts at 128 KiB and follows the largest block
freed so far) with a fresh mmap and unmaps it on free, and hands the free top of its heap back to the OS.
A CPU training step allocates and frees the same activation and gradient buffers every step, so with those
defaults each step pays a page fault per 4 KiB of most such buffers, zero-filled by the kernel, before any
arithmetic: ~3,500 per step of the demo's semi step. Raising the mmap threshold to glibc's maximum (32 MiB
on 64-bit) and the trim threshold to 2 GiB makes malloc carve those buffers from its heap and keep them:
under 50 faults per step, and a faster step (bench/test_bench_host_memory.py). The cost is a process that
keeps what it once needed (the step's peak activations) instead of returning it between steps.

Only glibc has this knob; elsewhere (macOS, musl, Windows) nothing changes."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (glibc malloc.h)
HEAP_UP_TO_BYTES = 32 << 20  # glibc's largest accepted mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
KEEP_UP_TO_BYTES = 2**31 - 1  # free memory at the heap's top that stays mapped (mallopt takes an int)


@functools.cache
def _mallopt():
    """glibc's mallopt, or None where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ctypes.CDLL(None).gnu_get_libc_version  # only glibc has it: musl's mallopt is a no-op stub
        return libc.mallopt
    except (OSError, AttributeError):
        return None


def apply(mode: str, on_cpu: bool) -> bool:
    """Set the process's malloc up for run.host_memory = `mode` (auto: keep on the CPU; keep; system) in a
    run that trains on the CPU or not; True when memory is now kept. "system" changes nothing (a process
    that already keeps its memory goes on keeping it)."""
    if mode == "system" or (mode == "auto" and not on_cpu):
        return False
    mallopt = _mallopt()
    return bool(mallopt and mallopt(M_MMAP_THRESHOLD, HEAP_UP_TO_BYTES) == 1
                and mallopt(M_TRIM_THRESHOLD, KEEP_UP_TO_BYTES) == 1)
