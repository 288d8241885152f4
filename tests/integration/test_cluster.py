"""Several processes (torchrun, gloo, 2 CPU ranks): a SIGTERM on one rank stops every rank after the same
step with one checkpoint, and the SLURM script (scripts/slurm_h14.sbatch) under a fake SLURM environment
checkpoints on a signal, requeues itself, and the requeued job resumes and ends where an uninterrupted
2-rank run ends, bit for bit."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from engine import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]
# The demo's fine-tune on 2 ranks, batch 8 per rank (3 steps per epoch), endless until signalled.
ENDLESS = ["--cfg", str(ROOT / "configs" / "digits.toml"), "--run.stages", "finetune", "--run.device", "cpu",
           "--data.batch_size", "8", "--stages.finetune.schedule.epochs", "100000",
           "--stages.finetune.checkpoint.every_epochs", "100000", "--logging.every_steps", "1",
           "--logging.progress", "false", "--logging.tensorboard", "false", "--run.threads", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "60"}


def children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (no psutil needed)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def rank_pid(root_pid: int, rank: int) -> int | None:
    for pid in descendants(root_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and any(e.startswith(b"LOCAL_RANK=") for e in env):
            return pid
    return None


def wait_for_training(proc: subprocess.Popen, out: Path, steps: int = 3, timeout: float = 180) -> None:
    """Until metrics.jsonl shows `steps` logged training steps (both ranks are inside the loop)."""
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text().count('"kind": "train"') >= steps):
        assert proc.poll() is None, f"the run ended early ({proc.returncode})"
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)


def finish(proc: subprocess.Popen, timeout: float = 180) -> str:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return err


def stopped_steps(stderr: str) -> list[int]:
    return [int(s) for s in re.findall(r"interrupted: stage finetune stopped at step (\d+)", stderr)]


def test_sigterm_on_one_rank_stops_all_ranks_after_the_same_step(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531",
           "-m", "engine.train", "--out", str(out), *ENDLESS]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for_training(proc, out)
        pid = rank_pid(proc.pid, 1)
        assert pid is not None, "rank 1 not found"
        os.kill(pid, signal.SIGTERM)  # only rank 1 is told to stop
        err = finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    steps = stopped_steps(err)
    assert len(steps) == 2 and steps[0] == steps[1], err[-3000:]  # both ranks, the same step
    saved = ckpt.list_checkpoints(out / "checkpoints", "finetune")
    assert len(saved) == 1
    state = ckpt.safe_load(saved[0])
    assert state["step"] == steps[0] and state["world_size"] == 2 and len(state["rng"]) == 2
    assert not list((out / "checkpoints").glob(".*.tmp"))


def fake_slurm(tmp_path: Path) -> tuple[dict, Path]:
    """`srun` runs its command once, on this machine; `scontrol` knows one host and logs requeues."""
    bin_dir, log = tmp_path / "fake-slurm-bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\ncase "$1 $2" in\n  "show hostnames") echo localhost ;;\n'
        f'  requeue*) echo "requeue $2" >> {log} ;;\nesac\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_RESTART_COUNT": "0", "NPROC_PER_NODE": "2",
           "MASTER_PORT": "29533", "CFG": str(ROOT / "configs" / "digits.toml"), "OUT": str(tmp_path / "run")}
    return env, log


def test_slurm_script_checkpoints_requeues_and_resumes(tmp_path):
    env, log = fake_slurm(tmp_path)
    out = Path(env["OUT"])
    script = ROOT / "scripts" / "slurm_h14.sbatch"
    # The job: preempted (SIGTERM to the batch script, as SLURM does), so it checkpoints and requeues.
    proc = subprocess.Popen(["bash", str(script), *ENDLESS[2:]], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_training(proc, out)
        os.kill(proc.pid, signal.SIGTERM)
        err = finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 3, err[-3000:]
    assert log.read_text().split() == ["requeue", "4242"]
    assert "rendezvous localhost:29533" in err
    steps = stopped_steps(err)
    assert len(steps) == 2 and steps[0] == steps[1], err[-3000:]
    (saved,) = ckpt.list_checkpoints(out / "checkpoints", "finetune")
    assert ckpt.safe_load(saved)["step"] == steps[0]

    # The requeued job: the same script and run folder; it resumes (the test shortens the rest to 2 steps).
    env["SLURM_RESTART_COUNT"] = "1"
    done = subprocess.run(["bash", str(script), *ENDLESS[2:], "--schedule.max_steps", str(steps[0] + 2)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed at step {steps[0]}/{steps[0] + 2}" in done.stdout
    assert log.read_text().split() == ["requeue", "4242"]  # no second requeue

    # Exact on 2 ranks: the same steps without the interruption end in the same weights, bit for bit
    # (each rank got its own RNG states back, and its streams their positions).
    straight = tmp_path / "straight"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29535",
           "-m", "engine.train", "--out", str(straight), *ENDLESS, "--schedule.max_steps", str(steps[0] + 2)]
    ran = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    a = ckpt.safe_load(out / "checkpoints" / "finetune-final.pt")
    b = ckpt.safe_load(straight / "checkpoints" / "finetune-final.pt")
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}: {key}"


# FSDP2 semi stage on 2 ranks: the student, the teacher and AdamW's state sharded per block; checkpoints
# are torch.distributed.checkpoint folders.
FSDP_SEMI = ["--cfg", str(ROOT / "configs" / "digits.toml"), "--run.stages", "semi", "--run.device", "cpu",
             "--dist.strategy", "fsdp", "--data.batch_size", "8", "--logging.every_steps", "1",
             "--logging.progress", "false", "--logging.tensorboard", "false", "--run.threads", "1"]


def torchrun(out: Path, *args: str, port: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "engine.train", "--out", str(out), *FSDP_SEMI, *args]
    ran = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    return ran


def test_fsdp_checkpoints_resume_exactly_on_two_ranks_and_reshard_to_one(tmp_path):
    from engine.config import load_plan
    from engine.models.build import build_model
    from engine.optim import build_optimizer

    cut, straight = tmp_path / "cut", tmp_path / "straight"
    torchrun(cut, "--schedule.max_steps", "3", port=29541)
    folder = cut / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(folder, "semi")] == ["semi-e0000-s000003.dcp"]
    (folder / "semi-final.pt").unlink()
    resumed = torchrun(cut, "--schedule.max_steps", "5", "--checkpoint.resume", "auto", port=29543)
    assert "resumed at step 3/5" in resumed.stdout
    torchrun(straight, "--schedule.max_steps", "5", port=29545)
    a = ckpt.safe_load(folder / "semi-final.pt")
    b = ckpt.safe_load(straight / "checkpoints" / "semi-final.pt")
    for part in ("model", "ema"):  # gathered from the shards: full tensors
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}: {key}"

    # The 2-rank checkpoint loads into one unsharded process (DCP reshards): the same weights
    cfg = load_plan(ROOT / "configs" / "digits.toml", [("run.stages", "semi")]).stages["semi"]
    student, teacher = build_model(cfg.model), build_model(cfg.model)
    optimizer = build_optimizer(student, cfg.optim, 1e-3)
    path, state = ckpt.newest_valid(folder, "semi")
    assert path.name == "semi-e0000-s000005.dcp" and state["world_size"] == 2
    ckpt.load_sharded(path, student, teacher, optimizer)
    for module, part in ((student, "model"), (teacher, "ema")):
        for key, value in module.state_dict().items():
            assert torch.equal(value, a[part][key]), f"{part}: {key}"
    assert len(optimizer.state) == len(list(student.parameters()))
    # ... and the engine resumes from it on one process and finishes
    (folder / "semi-final.pt").unlink()
    one = subprocess.run([sys.executable, "-m", "engine.train", "--out", str(cut), *FSDP_SEMI,
                          "--schedule.max_steps", "7", "--checkpoint.resume", "auto"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resumed at step 5/7 (saved by another number of processes" in one.stdout
    assert [p.name for p in ckpt.list_checkpoints(folder, "semi")][-1].endswith("s000007.dcp")
