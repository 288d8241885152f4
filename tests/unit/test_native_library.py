"""The native library: loading it lazily, and the status line that names the fix."""

from __future__ import annotations

from kernels import native


def test_status_not_built_and_broken(monkeypatch, tmp_path):
    """The status line names the fix: build when missing, rebuild when the file does not load."""
    monkeypatch.setattr(native, "_loaded", False)
    monkeypatch.setattr(native, "_error", None)
    monkeypatch.setenv("SEMIVIT_NATIVE_LIB", str(tmp_path / "missing.so"))
    assert not native.available()
    assert native.status() == f"native: not built — run: {native.BUILD_COMMAND}"
    broken = tmp_path / "broken.so"
    broken.write_text("not a shared library")
    monkeypatch.setenv("SEMIVIT_NATIVE_LIB", str(broken))
    assert not native.load()
    line = native.status()
    assert line.startswith(f"native: failed to load {broken} (") and line.endswith(native.BUILD_COMMAND)
    assert "\n" not in line


