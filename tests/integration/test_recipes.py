"""Every recipe passes the dry run (config, model, data plan, cost model), and `python -m engine.train` with no
arguments starts the demo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.train import main

ROOT = Path(__file__).resolve().parents[2]

RECIPES = sorted((ROOT / "configs").glob("*.toml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_dry_runs(recipe, capsys):
    assert main(["--cfg", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "forward GFLOPs" in out and "absolute lr" in out


def test_module_entry_point_without_arguments_starts_the_demo():
    # The dry run proves `python -m engine.train` picks configs/digits.toml and says so, without training.
    proc = subprocess.run([sys.executable, "-m", "engine.train", "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "embedded demo" in proc.stdout and "digits.toml" in proc.stdout
