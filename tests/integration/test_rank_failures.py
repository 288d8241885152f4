"""Hard rank failures on 2 CPU ranks (torchrun, gloo): a rank that hangs in the step makes every rank exit
within dist.timeout_s plus a margin, rank 0 naming the collective; a rank killed outright (SIGKILL) mid-epoch
under `torchrun --max-restarts 1` is survived: the group restarts, resumes from the last rolling checkpoint
and ends with the weights of an uninterrupted run, bit for bit (DDP fine-tune, and the semi stage under FSDP2).

The faults come from a launcher script written by the test: it wraps engine.stages.loop.optimizer_step on
one rank, in the first attempt only (TORCHELASTIC_RESTART_COUNT = 0), then runs engine.train as usual; the
engine itself has no test hooks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from engine import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--cfg", str(ROOT / "configs" / "digits.toml"), "--run.device", "cpu", "--data.batch_size", "8",
          "--logging.every_steps", "1", "--logging.progress", "false", "--logging.tensorboard", "false",
          "--run.threads", "1"]  # no --checkpoint.resume: a restart resumes its unfinished run folder by itself
# The demo's fine-tune on 2 ranks, batch 8 per rank: 3 steps per epoch, a rolling checkpoint every epoch;
# its semi stage under FSDP2, 32 labelled and 96 unlabelled images per rank: 6 steps per epoch.
FINETUNE = [*COMMON, "--run.stages", "finetune", "--stages.finetune.data.batch_size", "8",
            "--stages.finetune.schedule.epochs", "3",
            "--stages.finetune.schedule.warmup_epochs", "1",
            "--stages.finetune.checkpoint.every_epochs", "1"]
FSDP_SEMI = [*COMMON, "--run.stages", "semi", "--dist.strategy", "fsdp", "--stages.semi.data.batch_size", "32",
             "--schedule.max_steps", "9",
             "--stages.semi.checkpoint.every_epochs", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

LAUNCHER = '''
import os, signal, sys, time
import engine.stages.loop as loop
from engine.train import main

real_step, calls = loop.optimizer_step, 0


def faulty_step(*args, **kwargs):
    global calls
    calls += 1
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if os.environ["RANK"] == "1" and calls == {call} and first_attempt:
        with open({marker!r}, "w") as f:
            f.write(str(time.time()))
        {fault}
    return real_step(*args, **kwargs)


loop.optimizer_step = faulty_step
sys.exit(main())
'''
FAULTS = {"stall": "time.sleep(3600)", "kill": "os.kill(os.getpid(), signal.SIGKILL)"}


def launcher(tmp_path: Path, fault: str, call: int) -> tuple[Path, Path]:
    """A script that runs engine.train with `fault` on rank 1 at its `call`-th optimizer step; and the file
    it writes (the time) just before."""
    marker = tmp_path / f"{fault}.at"
    script = tmp_path / f"{fault}_train.py"
    script.write_text(LAUNCHER.format(call=call, marker=str(marker), fault=FAULTS[fault]))
    return script, marker


def torchrun(*args: str, port: int, restarts: int = 0, log_dir: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "--max-restarts", str(restarts)]
    if log_dir is not None:  # each rank's stderr in its own file: log_dir/<run id>/attempt_0/<rank>/stderr.log
        cmd += ["--log-dir", str(log_dir), "--redirects", "2"]
    return cmd + list(args)


def same_weights(a_path: Path, b_path: Path) -> None:
    a, b = ckpt.safe_load(a_path), ckpt.safe_load(b_path)
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}: {key}"


def test_a_hung_rank_ends_every_rank_within_the_timeout_and_rank_0_names_the_collective(tmp_path):
    # The margin: torchrun gives a rank that ignores its SIGTERM (the hung one) 30 s before it SIGKILLs it
    # (on a failure it does not read TORCH_ELASTIC_SHUTDOWN_TIMEOUT), plus a loaded CPU's slack.
    timeout_s, margin_s = 10, 45
    script, marker = launcher(tmp_path, "stall", call=3)
    logs = tmp_path / "logs"
    cmd = torchrun(str(script), "--out", str(tmp_path / "run"), *FINETUNE, "--dist.timeout_s", str(timeout_s),
                   port=29551, log_dir=logs)
    ran = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    ended = time.time()
    assert marker.is_file(), ran.stderr[-3000:]  # rank 1 did stall
    assert ran.returncode != 0
    assert ended - float(marker.read_text()) < timeout_s + margin_s
    # torchrun's summary lists every rank that exited non-zero: both
    codes = dict(re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", ran.stderr))
    assert set(codes) == {"0", "1"} and all(int(c) != 0 for c in codes.values()), ran.stderr[-3000:]
    (rank0,) = logs.glob("*/attempt_0/0/stderr.log")
    last = rank0.read_text().strip().splitlines()[-1]
    assert last.startswith("error: rank 0: the gradient all-reduce (DDP) of step 3 timed out after 10 s "
                           "(dist.timeout_s)"), last
    assert "Check the other ranks' logs" in last and "--checkpoint.resume auto" in last


def test_a_rank_killed_mid_epoch_is_survived_by_a_restart_that_resumes_exactly(tmp_path):
    out, straight = tmp_path / "run", tmp_path / "straight"
    script, marker = launcher(tmp_path, "kill", call=5)  # step 5 of 9: mid-epoch, after step 3's checkpoint
    ran = subprocess.run(torchrun(str(script), "--out", str(out), *FINETUNE, port=29553, restarts=1),
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert marker.is_file()  # rank 1 was killed in the first attempt
    assert "resumed at step 3/9" in ran.stdout, ran.stdout[-3000:]
    done = subprocess.run(torchrun("-m", "engine.train", "--out", str(straight), *FINETUNE, port=29555),
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    same_weights(out / "checkpoints" / "finetune-final.pt", straight / "checkpoints" / "finetune-final.pt")
    assert (out / "model.safetensors").is_file()


def test_a_rank_killed_in_the_fsdp_semi_stage_is_survived_by_a_restart_that_resumes_exactly(tmp_path):
    out, straight = tmp_path / "run", tmp_path / "straight"
    script, marker = launcher(tmp_path, "kill", call=8)  # step 8 of 9, after step 6's checkpoint (6 per epoch)
    ran = subprocess.run(torchrun(str(script), "--out", str(out), *FSDP_SEMI, port=29557, restarts=1),
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert marker.is_file()
    assert "resumed at step 6/9" in ran.stdout, ran.stdout[-3000:]
    done = subprocess.run(torchrun("-m", "engine.train", "--out", str(straight), *FSDP_SEMI, port=29559),
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    same_weights(out / "checkpoints" / "semi-final.pt", straight / "checkpoints" / "semi-final.pt")
