"""Which instruction-set copy of the native loops runs (kernels.native.instruction_set) and forcing a
narrower one with SEMIVIT_NATIVE_ISA."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernels import native

_COPIES = ("avx512", "avx2", "baseline")


def _widest_copy_from_cpuinfo() -> str:
    """What the CPU flags allow: x86-64-v4 (AVX-512 F/BW/CD/DQ/VL), x86-64-v3 (AVX2, FMA, BMI2...)."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags:
        return "avx512"
    if {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"} <= flags:
        return "avx2"
    return "baseline"


def test_the_instruction_set_is_the_widest_copy_the_cpu_runs(native_ops, monkeypatch):
    monkeypatch.delenv(native.ISA_ENV, raising=False)
    chosen = native.instruction_set()
    assert chosen in _COPIES
    if Path("/proc/cpuinfo").is_file():
        assert chosen == _widest_copy_from_cpuinfo()
    monkeypatch.setenv(native.ISA_ENV, "")  # empty counts as unset
    assert native.instruction_set() == chosen


def test_a_narrower_copy_can_be_forced_and_a_wider_one_cannot(native_ops, monkeypatch):
    monkeypatch.delenv(native.ISA_ENV, raising=False)
    widest = _COPIES.index(native.instruction_set())
    for isa in _COPIES[widest:]:
        monkeypatch.setenv(native.ISA_ENV, isa)
        assert native.instruction_set() == isa
    for isa in _COPIES[:widest]:
        monkeypatch.setenv(native.ISA_ENV, isa)
        with pytest.raises(RuntimeError, match=f"{native.ISA_ENV}={isa}: this CPU runs at most the "
                                               f"{_COPIES[widest]} copy.*unset {native.ISA_ENV}"):
            native.instruction_set()


def test_an_unknown_instruction_set_is_an_error_naming_the_choices(native_ops, monkeypatch):
    monkeypatch.setenv(native.ISA_ENV, "AVX2")  # the names are lower case, as instruction_set() returns them
    expected = "SEMIVIT_NATIVE_ISA=AVX2 is not an instruction set.*avx512, avx2 or baseline"
    with pytest.raises(RuntimeError, match=expected):
        native.instruction_set()
    z = native_ops.soft_target_ce  # the op itself refuses too, before any work
    import torch

    with pytest.raises(RuntimeError, match="is not an instruction set"):
        z(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), torch.ones(2),
          None, 0.1, False)


def test_instruction_set_without_the_library_names_the_build_command(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_loaded", False)
    monkeypatch.setattr(native, "_error", None)
    monkeypatch.setenv("SEMIVIT_NATIVE_LIB", str(tmp_path / "missing.so"))
    with pytest.raises(RuntimeError, match="not built — run: cmake"):
        native.instruction_set()
