"""What the content checksum costs: save and load time of a ViT-B/16 rolling checkpoint (model, AdamW state,
EMA teacher: what a semi checkpoint holds) with and without it. Each round writes (or reads) both variants
one after the other, so that both see the same disk and page-cache state; prints the medians and the ratio.

    python -m pytest bench/test_bench_checkpoint.py -q -s
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ckpt
from engine import checksums
from engine.config import ModelConfig
from engine.models.build import build_model
from engine.runtime import rng_state

ROUNDS = 2


@pytest.fixture(scope="module")
def vit_b_state() -> dict:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="vit_base_patch16"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()  # fills exp_avg / exp_avg_sq: the optimizer state a rolling checkpoint carries
    teacher = {k: v.clone() for k, v in model.state_dict().items()}
    return {"stage_name": "semi", "step": 1000, "skipped": 0.0, "best": {"score": 71.5}, "rng": [rng_state()],
            "steps_per_epoch": 100, "world_size": 1, "model": model.state_dict(), "stage": {"ema": teacher},
            "optimizer": optimizer.state_dict()}


def state_bytes(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def save(state: dict, path: Path, checksum: bool) -> None:
    if checksum:
        ckpt.atomic_save(state, path)
        return
    real = checksums.with_checksum
    checksums.with_checksum = lambda obj: obj  # the same write path, without the checksum
    try:
        ckpt.atomic_save(state, path)
    finally:
        checksums.with_checksum = real


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def report(benchmark, what: str, times: dict[str, list[float]], size: int) -> None:
    plain, checked = statistics.median(times["plain"]), statistics.median(times["checksum"])
    benchmark.extra_info.update({"plain_s": plain, "checksum_s": checked, "ratio": checked / plain})
    print(f"\n{what} of a ViT-B/16 checkpoint ({size / 2**30:.2f} GiB): {plain:.2f} s without the checksum, "
          f"{checked:.2f} s with it: x{checked / plain:.2f} (median of {len(times['plain'])}, "
          f"{torch.get_num_threads()} threads)")


def test_bench_checkpoint_save(benchmark, vit_b_state, tmp_path):
    times: dict[str, list[float]] = {"plain": [], "checksum": []}

    def both():
        times["plain"].append(timed(lambda: save(vit_b_state, tmp_path / "plain.pt", checksum=False)))
        times["checksum"].append(timed(lambda: save(vit_b_state, tmp_path / "checked.pt", checksum=True)))

    benchmark.pedantic(both, rounds=ROUNDS, iterations=1)
    assert checksums.KEY in torch.load(tmp_path / "checked.pt", weights_only=True, mmap=True)
    assert checksums.KEY not in torch.load(tmp_path / "plain.pt", weights_only=True, mmap=True)
    report(benchmark, "save (torch.save + fsync + rename)", times, state_bytes(vit_b_state))
    hash_s = timed(lambda: checksums.content_checksum(vit_b_state))
    print(f"the checksum alone (sha256 over every tensor): {hash_s:.2f} s, "
          f"{state_bytes(vit_b_state) / hash_s / 2**30:.2f} GiB/s")


def test_bench_checkpoint_load(benchmark, vit_b_state, tmp_path):
    save(vit_b_state, tmp_path / "plain.pt", checksum=False)
    save(vit_b_state, tmp_path / "checked.pt", checksum=True)
    times: dict[str, list[float]] = {"plain": [], "checksum": []}

    def both():
        times["plain"].append(timed(lambda: ckpt.safe_load(tmp_path / "plain.pt")))  # no checksum: not checked
        times["checksum"].append(timed(lambda: ckpt.safe_load(tmp_path / "checked.pt")))

    benchmark.pedantic(both, rounds=ROUNDS, iterations=1)
    report(benchmark, "load (safe_load, from the page cache)", times, state_bytes(vit_b_state))
