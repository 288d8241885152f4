"""The Triton kernels compile for sm_90 without a GPU, and the GPU kernel benchmark runs in its smoke form."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


