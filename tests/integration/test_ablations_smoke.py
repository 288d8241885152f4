"""The ablation runner end to end: `python -m bench.ablations --smoke` trains its 2-run grid (one MAE
pre-training, a supervised and a Semi-ViT run of a few steps), writes the table, the plot, the raw JSON and
the RESULTS.md section, and a rerun of the same command redoes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    for name, stages in (("supervised-l2-s0", ["finetune"]), ("semivit-l2-s0", ["finetune", "semi"])):
        record = json.loads((tmp_path / "copy" / f"{name}.json").read_text())
        assert record["run_stages"] == stages and list(record["stage_results"]) == stages
        assert 0.0 <= record["teacher_top1"] <= record["peak_teacher_top1"] <= 100.0
        assert record["teacher_history"], "the scored stage's evaluations come from metrics.jsonl"
        assert (sweep / "runs" / name / "checkpoints" / f"{stages[-1]}-final.pt").is_file()
    table = (sweep / "table.md").read_text()
    assert "| variant | labels/class 2 | collapsed |" in table and "| semivit |" in table
    assert (sweep / "ablations.png").is_file() and (tmp_path / "copy" / "ablations.png").is_file()
    section = (tmp_path / "RESULTS.md").read_text()
    assert section.count(BEGIN) == 1 and END in section and "| supervised |" in section

    again = smoke(tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "2 runs (0 to do)" in again.stdout and again.stdout.count("(finished earlier)") == 2
    assert (tmp_path / "RESULTS.md").read_text().count(BEGIN) == 1
