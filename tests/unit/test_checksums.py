"""Content checksums: written at save time into every checkpoint (file, DCP folder, model.safetensors), checked
at load; a damaged file is named, resume skips it, and files without a checksum still load."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine import checkpoint as ckpt
from engine import checksums
from engine.errors import UserError


def small_state(step: int = 3) -> dict:
    gen = torch.Generator().manual_seed(step)
    return {"stage_name": "finetune", "step": step, "skipped": 0.0, "best": {"score": float("-inf")},
            "model": {"w": torch.randn(64, 32, generator=gen), "b": torch.randn(32, generator=gen).bfloat16(),
                      "n": torch.tensor(7)},
            "optimizer": {"state": {0: {"exp_avg": torch.zeros(64, 32), "step": torch.tensor(3.0)}},
                          "param_groups": [{"lr": 0.1, "params": [0]}]},
            "rng": [{"torch": torch.get_rng_state(), "python": (3, [1, 2], None)}]}


def flip_inside(path: Path, tensor: torch.Tensor, n: int = 64) -> None:
    """Invert n bytes in the middle of `tensor`'s stored bytes: the file keeps its structure and still opens."""
    raw = bytearray(path.read_bytes())
    data = bytes(checksums.tensor_bytes(tensor))
    at = raw.find(data[:256])
    assert at >= 0, "the tensor's bytes were not found in the file"
    middle = at + len(data) // 2
    raw[middle:middle + n] = bytes(b ^ 0xFF for b in raw[middle:middle + n])
    path.write_bytes(bytes(raw))


def test_a_saved_checkpoint_loads_back_unchanged_and_without_its_checksum_entry(tmp_path):
    state = small_state()
    ckpt.atomic_save(state, tmp_path / "a.pt")
    raw = torch.load(tmp_path / "a.pt", weights_only=True)
    assert raw[checksums.KEY].startswith("sha256:")
    back = ckpt.safe_load(tmp_path / "a.pt")
    assert checksums.KEY not in back and list(back) == list(state)
    assert back["step"] == 3 and back["rng"][0]["python"] == (3, [1, 2], None)
    for key, t in state["model"].items():
        assert torch.equal(back["model"][key], t) and back["model"][key].dtype == t.dtype


def test_64_flipped_bytes_inside_a_tensor_are_reported_naming_the_file(tmp_path):
    state = small_state()
    path = tmp_path / "finetune-e0001-s000003.pt"
    ckpt.atomic_save(state, path)
    flip_inside(path, state["model"]["w"])
    torch.load(path, weights_only=True)  # the damage is invisible to the unpickler
    with pytest.raises(UserError, match=r"'.*finetune-e0001-s000003\.pt' is damaged: its content does not match"):
        ckpt.safe_load(path)


def test_a_changed_number_dtype_or_key_changes_the_checksum():
    state = small_state()
    digest = checksums.content_checksum(state)
    assert checksums.content_checksum(small_state()) == digest  # deterministic
    changed = [{**state, "step": 4}, {**state, "best": {"score": 0.0}},
               {**state, "model": {**state["model"], "n": torch.tensor(7, dtype=torch.int32)}},
               {**state, "model": {**state["model"], "w": state["model"]["w"].reshape(32, 64)}},
               {k if k != "skipped" else "skips": v for k, v in state.items()}]
    assert all(checksums.content_checksum(c) != digest for c in changed)


def test_a_checksum_entry_left_from_the_save_does_not_enter_its_own_digest():
    state = small_state()
    saved = checksums.with_checksum(state)
    assert checksums.mismatch(saved) is None and checksums.KEY not in saved
    tampered = checksums.with_checksum(state)
    tampered["step"] = 99
    assert "does not match" in checksums.mismatch(tampered)
    assert "unknown algorithm" in checksums.mismatch({"step": 1, checksums.KEY: "md5:00"})


def test_a_checksum_less_mae_style_checkpoint_still_loads(tmp_path):
    """The original MAE / Semi-ViT files: {'model': ...} with the training script's Namespace, no checksum."""
    weights = {"cls_token": torch.zeros(1, 1, 8), "blocks.0.norm1.weight": torch.ones(8)}
    torch.save({"model": weights, "args": argparse.Namespace(lr=1e-3), "epoch": 799}, tmp_path / "mae.pth")
    state = ckpt.safe_load(tmp_path / "mae.pth")
    assert state["epoch"] == 799 and torch.equal(state["model"]["cls_token"], weights["cls_token"])


def test_resume_skips_a_damaged_newest_checkpoint_with_a_line_naming_it(tmp_path, capsys):
    folder = tmp_path / "checkpoints"
    older, newer = small_state(3), small_state(6)
    ckpt.save_rolling(older, folder, "finetune", 1, 3, keep=2)
    newest = ckpt.save_rolling(newer, folder, "finetune", 2, 6, keep=2)
    flip_inside(newest, newer["model"]["w"])
    path, state = ckpt.newest_valid(folder, "finetune")
    assert path.name == "finetune-e0001-s000003.pt" and state["step"] == 3
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1 and "warning: skipping" in out and f"'{newest}' is damaged" in out


def test_model_safetensors_carries_its_checksum_and_a_tampered_one_is_refused(tmp_path):
    weights = small_state()["model"]
    path = tmp_path / "model.safetensors"
    ckpt.export_safetensors(weights, path)
    assert set(ckpt.load_safetensors(path)) == set(weights)
    assert set(ckpt.safe_load(path)["model"]) == set(weights)  # model.init / eval.checkpoint read it too
    flip_inside(path, weights["w"])
    with pytest.raises(UserError, match=r"model\.safetensors' is damaged"):
        ckpt.load_safetensors(path)
    with pytest.raises(UserError, match=r"model\.safetensors' is damaged"):
        ckpt.safe_load(path)


def test_a_safetensors_file_without_a_checksum_still_loads(tmp_path):
    save_file({"w": torch.ones(3, 3)}, str(tmp_path / "plain.safetensors"))
    assert torch.equal(ckpt.load_safetensors(tmp_path / "plain.safetensors")["w"], torch.ones(3, 3))


class OneProcess:
    """The part of engine.runtime.Runtime that save_sharded uses, for one process."""
    is_main = True

    def main_only(self, write):
        write()


def sharded_checkpoint(tmp_path: Path) -> tuple[Path, torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 256)).sum().backward()
    optimizer.step()
    path = ckpt.save_sharded({"stage_name": "semi", "step": 4}, model, None, optimizer, tmp_path, "semi", 1, 4,
                             keep=2, rt=OneProcess())
    return path, model, optimizer


def test_a_dcp_folder_lists_a_digest_of_each_file_and_loads_when_intact(tmp_path):
    path, model, optimizer = sharded_checkpoint(tmp_path)
    meta = torch.load(path / "meta.pt", weights_only=True)
    assert set(meta["shards"]) == {p.name for p in path.iterdir() if p.name != "meta.pt"} and meta["shards"]
    state = ckpt.load_resumable(path)
    assert state["step"] == 4 and state["dcp"] == path and "shards" not in state
    ckpt.load_sharded(path, model, None, optimizer)


def test_a_damaged_or_missing_dcp_shard_is_reported_naming_it(tmp_path):
    path, model, _ = sharded_checkpoint(tmp_path)
    shard = max((p for p in path.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    flip_inside(shard, model.weight.detach())
    with pytest.raises(UserError, match=rf"'{shard}' is damaged"):
        ckpt.load_resumable(path)
    shard.unlink()
    with pytest.raises(UserError, match=rf"'{path}' is incomplete: its file '{shard.name}' is missing"):
        ckpt.load_resumable(path)
