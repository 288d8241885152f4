"""Failures a long run meets: an exact resume of the semi stage, a full disk, an unwritable --out, and a
process killed while it writes a checkpoint. Single process; the multi-process cases are in test_cluster.py."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ckpt
from engine.config import load_plan
from engine.session import run_plan
from engine.stages import semi as semi_mod
from engine.train import main

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "digits.toml"
FAST = ["--logging.progress", "false", "--logging.tensorboard", "false", "--run.threads", "1"]
# finetune: 50 labels, batch 16 -> 3 steps per epoch; a rolling checkpoint every epoch
FINETUNE = ["--run.stages", "finetune", "--stages.finetune.checkpoint.every_epochs", "1", *FAST]


pytestmark = pytest.mark.usefixtures("one_thread")  # the shared fixture (conftest.py)


def pairs(args: list[str]) -> list[tuple[str, str]]:
    return [(k[2:], v) for k, v in zip(args[::2], args[1::2])]


def semi_plan(max_steps: int, *extra: str):
    # batch 8: the labelled stream (50 images) wraps every 6 steps, the unlabelled one (24 per step) does not
    args = ["--run.stages", "semi", "--data.batch_size", "8", "--schedule.max_steps", str(max_steps),
            "--logging.every_steps", "1", *FAST, *extra]
    return load_plan(DEMO, pairs(args))


def record_semi_steps(monkeypatch) -> list[dict]:
    """Per step: what both streams delivered and every pseudo-mixup draw, as exact tensors."""
    seen: list[dict] = []
    real_prepare, real_mixup = semi_mod.SemiStage.prepare, semi_mod.pseudo_mixup

    def prepare(self, batch):
        (x, y), (u_weak, u_strong, u_true) = batch
        seen.append({"x": x.clone(), "y": y.clone(), "u_weak": u_weak.clone(), "u_strong": u_strong.clone(),
                     "u_true": u_true.clone()})
        return real_prepare(self, batch)

    def mixup(*args, **kwargs):
        mixed = real_mixup(*args, **kwargs)
        seen[-1].update({f"mix_{k}": v.clone() for k, v in mixed._asdict().items()})
        return mixed

    monkeypatch.setattr(semi_mod.SemiStage, "prepare", prepare)
    monkeypatch.setattr(semi_mod, "pseudo_mixup", mixup)
    return seen


def test_semi_resume_is_bit_identical_to_a_straight_run(tmp_path, monkeypatch):
    """N steps straight == k steps, stop, resume, N - k steps: student, teacher, optimizer state, the
    streams' batches and the pseudo-mixup draws, bit for bit (CPU)."""
    n, k = 8, 3
    seen = record_semi_steps(monkeypatch)
    straight = tmp_path / "straight"
    run_plan(semi_plan(n), straight)
    straight_steps = list(seen)
    seen.clear()
    cut = tmp_path / "cut"
    run_plan(semi_plan(k), cut)  # stops after step k, saving a resumable checkpoint
    (cut / "checkpoints" / "semi-final.pt").unlink()
    seen.clear()
    run_plan(semi_plan(n, "--checkpoint.resume", "auto"), cut)
    resumed_steps = list(seen)

    assert len(straight_steps) == n and len(resumed_steps) == n - k
    for step, (a, b) in enumerate(zip(straight_steps[k:], resumed_steps), start=k + 1):
        assert a.keys() == b.keys() and "mix_lam" in a
        for key in a:
            assert torch.equal(a[key], b[key]), f"step {step}: {key}"
    name = ckpt.checkpoint_name("semi", 0, n)
    a, b = ckpt.safe_load(straight / "checkpoints" / name), ckpt.safe_load(cut / "checkpoints" / name)
    for part in ("model", "stage"):
        flat_a = a[part] if part == "model" else a[part]["ema"]
        flat_b = b[part] if part == "model" else b[part]["ema"]
        assert flat_a.keys() == flat_b.keys()
        for key in flat_a:
            assert torch.equal(flat_a[key], flat_b[key]), f"{part}: {key}"
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and state_a
    for i in state_a:
        for key in state_a[i]:
            assert torch.equal(state_a[i][key], state_b[i][key]), f"optimizer state {i}.{key}"
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


def test_unwritable_out_exits_2_with_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(["--out", str(blocker / "run"), *FINETUNE, "--schedule.max_steps", "1"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and str(blocker / "run") in err


def test_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    """ENOSPC halfway through the second checkpoint: exit 2, one line, the first checkpoint intact and no
    partial file left; once there is space, --checkpoint.resume auto continues from the first."""
    real_save = torch.save

    def fill_the_disk(obj, f, *args, **kwargs):
        if "s000006" in getattr(f, "name", ""):
            f.write(b"\0" * 4096)  # part of the file made it to the disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    out = tmp_path / "full"
    monkeypatch.setattr(torch, "save", fill_the_disk)
    assert main(["--out", str(out), *FINETUNE, "--schedule.max_steps", "9"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "--checkpoint.resume auto" in err
    folder = out / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(folder, "finetune")] == ["finetune-e0001-s000003.pt"]
    assert not list(folder.glob(".*.tmp"))
    assert ckpt.newest_valid(folder, "finetune")[1]["step"] == 3

    monkeypatch.setattr(torch, "save", real_save)
    assert main(["--out", str(out), *FINETUNE, "--schedule.max_steps", "9", "--checkpoint.resume", "auto"]) == 0
    assert "resumed at step 3/9" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["stages"]["finetune"]["steps"] == 9


# Run in a subprocess: the third rolling checkpoint (step 6) writes half its bytes, says so, and sleeps,
# so that the test can SIGKILL the process mid-write. The product's save is untouched.
SLOW_SAVE = """
import io, os, sys, time, torch
real_save = torch.save
def slow_save(obj, f, *args, **kwargs):
    if "s000006" not in getattr(f, "name", ""):
        return real_save(obj, f, *args, **kwargs)
    buf = io.BytesIO(); real_save(obj, buf); data = buf.getvalue()
    f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
    open(os.environ["SAVE_STARTED"], "w").close()
    time.sleep(300)
    f.write(data[len(data) // 2:])
torch.save = slow_save
from engine.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_and_resume_continues(tmp_path, capsys):
    out, started = tmp_path / "killed", tmp_path / "save-started"
    args = ["--out", str(out), *FINETUNE, "--schedule.max_steps", "9"]
    env = {**os.environ, "SAVE_STARTED": str(started), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not started.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the run never reached its second checkpoint"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    folder = out / "checkpoints"
    partial = folder / ".finetune-e0002-s000006.pt.tmp"
    assert partial.is_file()  # the half-written file is there, under its temporary name
    assert [p.name for p in ckpt.list_checkpoints(folder, "finetune")] == ["finetune-e0001-s000003.pt"]
    assert ckpt.newest_valid(folder, "finetune")[1]["step"] == 3

    assert main([*args, "--checkpoint.resume", "auto"]) == 0
    assert "resumed at step 3/9" in capsys.readouterr().out
    assert not partial.exists()  # the next save cleared it
    assert json.loads((out / "results.json").read_text())["stages"]["finetune"]["steps"] == 9


def test_full_disk_during_a_sharded_save_keeps_the_previous_checkpoint_folder(tmp_path, monkeypatch, capsys):
    """The same under dist.strategy = "fsdp" (torch.distributed.checkpoint folders, one process here)."""
    import torch.distributed.checkpoint as dcp

    real_save = dcp.save

    def fill_the_disk(state, checkpoint_id, *args, **kwargs):
        if "s000006" in str(checkpoint_id):
            Path(checkpoint_id).mkdir(parents=True, exist_ok=True)
            (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"\0" * 4096)  # some shards made it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(state, *args, checkpoint_id=checkpoint_id, **kwargs)

    out = tmp_path / "full"
    args = ["--out", str(out), *FINETUNE, "--dist.strategy", "fsdp", "--schedule.max_steps", "9"]
    monkeypatch.setattr(dcp, "save", fill_the_disk)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err
    folder = out / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(folder, "finetune")] == ["finetune-e0001-s000003.dcp"]
    assert not list(folder.glob(".*.tmp"))
    monkeypatch.setattr(dcp, "save", real_save)
    assert main([*args, "--checkpoint.resume", "auto"]) == 0
    assert "resumed at step 3/9" in capsys.readouterr().out


def test_a_stage_resumed_at_its_last_step_evaluates_and_finishes(tmp_path):
    """Killed after the last rolling checkpoint but before <stage>-final.pt: the resumed run trains no step,
    evaluates once (into the still-open metrics log) and writes the final checkpoint."""
    args = [*FINETUNE, "--schedule.max_steps", "3", "--out", str(tmp_path)]
    assert main(args) == 0
    (tmp_path / "checkpoints" / "finetune-final.pt").unlink()
    assert main([*args, "--checkpoint.resume", "auto"]) == 0
    assert (tmp_path / "checkpoints" / "finetune-final.pt").is_file()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 3] and evals[0]["top1"] == evals[1]["top1"]
