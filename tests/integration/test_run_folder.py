"""A start into a folder that already holds a run: refused, resumed or replaced, never destroyed silently; and
damaged checkpoints found by their checksums in real run folders (rolling file, DCP folder, model.safetensors)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import checkpoint as ckpt
from engine import checksums, predict
from engine.train import main

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--logging.progress", "false", "--logging.tensorboard", "false", "--run.threads", "1"]
# finetune: 50 labels, batch 16 -> 3 steps per epoch; a rolling checkpoint every epoch
FINETUNE = ["--run.stages", "finetune", "--stages.finetune.checkpoint.every_epochs", "1", *FAST]
WAYS_ON = ("--checkpoint.resume auto", "another --out", "--checkpoint.overwrite true")


pytestmark = pytest.mark.usefixtures("one_thread")  # the shared fixture (conftest.py)


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under the folder: its modification time and a digest of its bytes."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def interrupted(out: Path) -> None:
    """What a run killed after its step-3 checkpoint (and before step 6's) leaves: no final files, no results."""
    for name in ("checkpoints/finetune-e0002-s000006.pt", "checkpoints/finetune-final.pt", "results.json",
                 "report.md", "model.safetensors"):
        (out / name).unlink(missing_ok=True)
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints", "finetune")] == ["finetune-e0001-s000003.pt"]


def assert_refused(capsys, out: Path, what: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"--out '{out}' already holds {what}" in err and all(way in err for way in WAYS_ON), err
    return err


def test_a_finished_run_is_refused_before_any_work_and_left_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--out", str(out), *FINETUNE, "--schedule.max_steps", "3"]) == 0
    before = snapshot(out)
    capsys.readouterr()
    for steps in ("2", "3"):  # a mistyped rerun, and the very same command
        assert main(["--out", str(out), *FINETUNE, "--schedule.max_steps", steps]) == 2
        assert_refused(capsys, out, "a finished run")
        assert snapshot(out) == before


def test_an_interrupted_run_with_the_same_config_resumes_by_itself(tmp_path, capsys):
    out, args = tmp_path / "run", ["--out", str(tmp_path / "run"), *FINETUNE, "--schedule.max_steps", "6"]
    assert main(args) == 0
    interrupted(out)
    capsys.readouterr()
    assert main(args) == 0  # the same command, as a requeued job or a torchrun restart reruns it
    said = capsys.readouterr().out
    assert f"run folder {out} holds an unfinished run of this config: resuming it" in said
    assert "resumed at step 3/6" in said
    assert json.loads((out / "results.json").read_text())["stages"]["finetune"]["steps"] == 6


def test_an_interrupted_run_resumes_by_itself_on_another_cpu_thread_count(tmp_path, capsys):
    """run.threads says how fast to go, not what to train: a sweep resumed with another --jobs changes it."""
    out, args = tmp_path / "run", ["--out", str(tmp_path / "run"), *FINETUNE, "--schedule.max_steps", "6"]
    assert main(args) == 0
    interrupted(out)
    capsys.readouterr()
    assert main([*args, "--run.threads", "2"]) == 0
    assert "resumed at step 3/6" in capsys.readouterr().out


def test_an_interrupted_run_with_another_config_is_refused_naming_the_difference(tmp_path, capsys):
    out, args = tmp_path / "run", ["--out", str(tmp_path / "run"), *FINETUNE, "--schedule.max_steps", "6"]
    assert main(args) == 0
    interrupted(out)
    before = snapshot(out)
    capsys.readouterr()
    assert main([*args, "--optim.blr", "0.5"]) == 2
    err = assert_refused(capsys, out, "an unfinished run with another config")
    assert "optim.blr" in err
    assert snapshot(out) == before
    # the documented way on still continues it, with the new value
    assert main([*args, "--optim.blr", "0.5", "--checkpoint.resume", "auto"]) == 0
    assert "resumed at step 3/6" in capsys.readouterr().out


def test_a_folder_holding_only_a_config_starts_afresh(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.toml").write_text("[optim]\nblr = 0.25\n")  # even another run's config
    assert main(["--out", str(out), *FINETUNE, "--schedule.max_steps", "3"]) == 0
    said = capsys.readouterr().out
    assert "resum" not in said
    assert json.loads((out / "results.json").read_text())["stages"]["finetune"]["steps"] == 3
    assert "blr = 0.25" not in (out / "config.toml").read_text()


def test_overwrite_replaces_a_finished_run_with_a_new_one(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--out", str(out), *FINETUNE, "--schedule.max_steps", "6"]) == 0
    capsys.readouterr()
    assert main(["--out", str(out), *FINETUNE, "--schedule.max_steps", "2", "--checkpoint.overwrite", "true"]) == 0
    assert f"run folder {out}: checkpoint.overwrite = true: removing the run it held" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["stages"]["finetune"]["steps"] == 2
    # nothing of the old run is left to be pruned wrongly or mixed into the logs
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints", "finetune")] == ["finetune-e0000-s000002.pt"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 2


def test_overwrite_together_with_resume_is_refused(tmp_path, capsys):
    assert main(["--out", str(tmp_path), *FINETUNE, "--checkpoint.overwrite", "true",
                 "--checkpoint.resume", "auto"]) == 2
    assert "ask for opposite things" in capsys.readouterr().err


def largest_tensor(state) -> torch.Tensor:
    found: list[torch.Tensor] = []

    def walk(value):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(state)
    return max(found, key=lambda t: t.numel() * t.element_size())


def flip_64_bytes(path: Path, inside: bytes) -> None:
    raw = bytearray(path.read_bytes())
    at = raw.find(inside[:256])
    assert at >= 0
    middle = at + len(inside) // 2
    raw[middle:middle + 64] = bytes(b ^ 0xFF for b in raw[middle:middle + 64])
    path.write_bytes(bytes(raw))


def resume_past_damage(out, args, capsys, damaged) -> None:
    """Unfinish the 6-step run and resume it: the damaged checkpoint is named and skipped, step 3's taken."""
    (out / "checkpoints" / "finetune-final.pt").unlink()
    capsys.readouterr()
    assert main([*args, "--checkpoint.resume", "auto"]) == 0
    said = capsys.readouterr().out
    assert f"warning: skipping checkpoint '{damaged}' is damaged" in said
    assert "resumed at step 3/6" in said


def test_resume_skips_a_rolling_checkpoint_with_64_flipped_bytes_and_takes_the_previous_one(tmp_path, capsys):
    out, args = tmp_path / "run", ["--out", str(tmp_path / "run"), *FINETUNE, "--schedule.max_steps", "6"]
    assert main(args) == 0
    newest = out / "checkpoints" / "finetune-e0002-s000006.pt"
    flip_64_bytes(newest, bytes(checksums.tensor_bytes(largest_tensor(ckpt.safe_load(newest)))))
    torch.load(newest, weights_only=True)  # it still opens: only the checksum tells
    resume_past_damage(out, args, capsys, damaged=newest)
    assert ckpt.safe_load(newest)["step"] == 6  # written again in place of the damaged file


def test_resume_skips_a_dcp_folder_with_a_damaged_shard(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--out", str(out), *FINETUNE, "--dist.strategy", "fsdp", "--schedule.max_steps", "6"]
    assert main(args) == 0
    newest = out / "checkpoints" / "finetune-e0002-s000006.dcp"
    shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    weights = ckpt.safe_load(out / "checkpoints" / "finetune-final.pt")["model"]
    flip_64_bytes(shard, bytes(checksums.tensor_bytes(largest_tensor(weights))))
    resume_past_damage(out, args, capsys, damaged=shard)
    assert ckpt.load_resumable(newest)["step"] == 6  # written again in place of the damaged folder
    assert not list((out / "checkpoints").glob(".*.tmp"))


def test_a_tampered_model_safetensors_is_reported_by_predict_and_model_init(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--out", str(out), *FINETUNE, "--schedule.max_steps", "3"]) == 0
    exported = out / "model.safetensors"
    flip_64_bytes(exported, bytes(checksums.tensor_bytes(largest_tensor(ckpt.load_safetensors(exported)))))
    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(image)
    capsys.readouterr()
    assert predict.main(["--checkpoint", str(exported), "--cfg", str(out / "config.toml"), str(image)]) == 2
    assert f"checkpoint '{exported}' is damaged" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "next"), *FINETUNE, "--schedule.max_steps", "3",
                 "--model.init", str(exported)]) == 2
    assert f"checkpoint '{exported}' is damaged" in capsys.readouterr().err
