"""The ablation runner end to end: `python -m bench.ablations --smoke` trains its 2-run grid (one MAE
pre-training, one fine-tune that is the supervised run and the Semi-ViT run's start, the semi stage of a few
steps), writes the table, the plot, the raw JSON and the RESULTS.md section, and a rerun of the same command
redoes nothing. And the sharing it relies on: a semi stage started from a fine-tune's final checkpoint trains
exactly as the same stage run after that fine-tune in one run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from bench.ablations_table import BEGIN, END

ROOT = Path(__file__).resolve().parents[2]


def smoke(tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bench.ablations", "--smoke", "--out", str(tmp_path / "sweep"),
           "--results-dir", str(tmp_path / "copy"), "--results-md", str(tmp_path / "RESULTS.md")]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_the_smoke_grid_trains_two_runs_from_one_mae_and_a_rerun_redoes_nothing(tmp_path):
    first = smoke(tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    sweep = tmp_path / "sweep"
    assert "2 runs (2 to do)" in first.stdout and "at a time" in first.stdout
    assert "[1/2] " in first.stdout and "[2/2] " in first.stdout and "ETA" in first.stdout
    assert "supervised   labels/class 2  seed 0  teacher top-1" in first.stdout
    assert sorted(p.name for p in sweep.iterdir() if p.name.startswith("mae")) == ["mae-seed0"]
    assert sorted(p.name for p in sweep.iterdir() if p.name.startswith("finetune")) == ["finetune-l2-s0"]
    for name, stages, trained, folder in (
            ("supervised-l2-s0", ["finetune"], ["finetune"], sweep / "finetune-l2-s0"),  # the shared fine-tune
            ("semivit-l2-s0", ["finetune", "semi"], ["semi"], sweep / "runs" / "semivit-l2-s0")):
        record = json.loads((tmp_path / "copy" / f"{name}.json").read_text())
        assert record["run_stages"] == stages and list(record["stage_results"]) == trained
        assert 0.0 <= record["teacher_top1"] <= record["peak_teacher_top1"] <= 100.0
        assert record["teacher_history"], "the scored stage's evaluations come from metrics.jsonl"
        assert record["run_dir"] == str(folder) and (folder / "checkpoints" / f"{stages[-1]}-final.pt").is_file()
    table = (sweep / "table.md").read_text()
    assert "| variant | labels/class 2 | collapsed |" in table and "| semivit |" in table
    assert (sweep / "ablations.png").is_file() and (tmp_path / "copy" / "ablations.png").is_file()
    section = (tmp_path / "RESULTS.md").read_text()
    assert section.count(BEGIN) == 1 and END in section and "| supervised |" in section

    again = smoke(tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "2 runs (0 to do)" in again.stdout and again.stdout.count("(finished earlier)") == 2
    assert (tmp_path / "RESULTS.md").read_text().count(BEGIN) == 1


def train(out: Path, *overrides: str) -> list[dict]:
    """A few steps of the demo's stages (as --smoke caps them; a low threshold, so that the teacher's pseudo
    labels count); the semi stage's logged rows."""
    cmd = [sys.executable, "-m", "engine.train", "--out", str(out), "--schedule.max_steps=6",
           "--stages.semi.schedule.max_steps=4", "--eval.every_epochs=1", "--logging.progress=false",
           "--logging.tensorboard=false", "--data.labels_per_class=2", "--stages.semi.semi.threshold=0.1",
           *overrides]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == "semi" and r["kind"] in ("eval", "train")]


def test_a_semi_stage_from_the_fine_tunes_checkpoint_trains_as_it_does_after_the_fine_tune_in_one_run(tmp_path):
    chained = train(tmp_path / "chained", "--run.stages=finetune,semi")
    train(tmp_path / "finetune", "--run.stages=finetune")
    shared = train(tmp_path / "shared", "--run.stages=semi",
                   f"--model.init={tmp_path / 'finetune' / 'checkpoints' / 'finetune-final.pt'}")
    timing = ("img_per_s", "data_wait_ms", "step_ms")
    assert chained[0]["loss_u"] > 0, "the teacher's pseudo labels took part"
    assert [{k: v for k, v in r.items() if k not in timing} for r in shared] == \
        [{k: v for k, v in r.items() if k not in timing} for r in chained]
    ends = [torch.load(tmp_path / run / "checkpoints" / "semi-final.pt", weights_only=False)
            for run in ("chained", "shared")]
    for part in ("model", "ema"):  # the student and the EMA teacher, bit for bit
        assert ends[0][part].keys() == ends[1][part].keys()
        assert all(torch.equal(ends[0][part][k], ends[1][part][k]) for k in ends[0][part])
