"""The disk check before the first step: the bytes a run keeps (every stage's rolling, best and final
checkpoints and the export) against the free space of the --out filesystem, faked here; --dry-run prints
the estimate."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine import costmodel as cm
from engine import preflight as pf
from engine.config import load_plan
from engine.errors import UserError
from engine.train import main

DEMO = Path(__file__).resolve().parents[2] / "configs" / "digits.toml"


def plan_of(*overrides: tuple[str, str]):
    return load_plan(DEMO, list(overrides))


def test_a_semi_stage_keeps_rolling_states_with_optimizer_and_teacher_plus_best_and_final():
    cfg = plan_of(("run.stages", "semi"), ("checkpoint.keep", "3")).stages["semi"]
    size = cm.model_size("semi", cfg)
    rows = cm.checkpoint_bytes("semi", cfg, size)
    record = cm.TENSOR_OVERHEAD
    weights_and_teacher = 2 * (4 * size.params + size.tensors * record)
    optimizer = 8 * size.trainable + 3 * size.trainable_tensors * record
    assert list(rows.values()) == [4 * (weights_and_teacher + optimizer + cm.RNG_STATE), weights_and_teacher,
                                   weights_and_teacher]
    assert "3 kept + 1 being written" in next(iter(rows))


def test_fsdp_shards_add_a_record_per_tensor_and_rank_but_no_tensor_bytes():
    cfg = plan_of(("run.stages", "semi"), ("dist.strategy", "fsdp")).stages["semi"]
    size = cm.model_size("semi", cfg)
    one, four = cm.checkpoint_bytes("semi", cfg, size, 1), cm.checkpoint_bytes("semi", cfg, size, 4)
    records = (2 * size.tensors + 3 * size.trainable_tensors) * cm.TENSOR_OVERHEAD
    rolling = next(iter(one))
    assert four[rolling] - one[rolling] == 3 * (3 * records + 3 * cm.RNG_STATE)  # keep + 1 copies, 3 more ranks
    assert four["best checkpoint"] == one["best checkpoint"]  # written whole by the main rank


def test_a_finetune_without_ema_keeps_no_teacher_and_the_export_can_be_turned_off():
    plan = plan_of(("run.stages", "finetune"), ("ema.enabled", "false"), ("checkpoint.export_safetensors", "false"))
    size = cm.model_size("finetune", plan.stages["finetune"])
    weights = 4 * size.params + size.tensors * cm.TENSOR_OVERHEAD
    optimizer = 8 * size.trainable + 3 * size.trainable_tensors * cm.TENSOR_OVERHEAD
    total, lines = cm.run_disk_bytes(plan)
    assert total == 3 * (weights + optimizer + cm.RNG_STATE) + 2 * weights
    assert len(lines) == 1 and "model.safetensors" not in lines[0]


def test_every_training_stage_counts_and_the_export_is_added_once():
    plan = plan_of()
    per_stage = [sum(cm.checkpoint_bytes(name, cfg, cm.model_size(name, cfg)).values())
                 for name, cfg in plan.stages.items()]
    last = list(plan.stages)[-1]
    size = cm.model_size(last, plan.stages[last])
    total, lines = cm.run_disk_bytes(plan)
    assert total == sum(per_stage) + 4 * size.params + size.tensors * cm.TENSOR_OVERHEAD
    assert len(lines) == len(plan.stages) + 1


def test_a_start_on_a_too_full_disk_is_refused_with_both_numbers(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pf, "free_bytes", lambda path: 1_000_000)
    out = tmp_path / "run"
    assert main(["--cfg", str(DEMO), "--run.stages", "finetune", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    need, _ = cm.run_disk_bytes(plan_of(("run.stages", "finetune")))
    assert len(err) == 1 and f"{need:,} bytes" in err[0] and "1,000,000 bytes) free" in err[0]
    assert str(out) in err[0] and "checkpoint.keep" in err[0]
    assert not out.exists()  # refused before anything was written


def test_enough_free_space_passes_and_a_resumed_folder_counts_what_it_already_holds(tmp_path, monkeypatch):
    plan = plan_of(("run.stages", "finetune"))
    need, _ = cm.run_disk_bytes(plan)
    monkeypatch.setattr(pf, "free_bytes", lambda path: need)
    pf.check_disk(plan, tmp_path / "fresh")
    monkeypatch.setattr(pf, "free_bytes", lambda path: need - 4096)
    with pytest.raises(UserError, match="not enough disk"):
        pf.check_disk(plan, tmp_path / "fresh")
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    (resumed / "finetune-e0001-s000010.pt").write_bytes(b"\0" * 4096)  # replaced by the run's own saves
    pf.check_disk(plan, tmp_path / "resumed")


def test_free_space_is_read_on_the_nearest_existing_parent(tmp_path, monkeypatch):
    asked = []

    def usage(path):
        asked.append(Path(path))
        return shutil._ntuple_diskusage(100, 40, 60)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    assert pf.free_bytes(tmp_path / "not" / "made" / "yet") == 60
    assert asked == [tmp_path]


def test_dry_run_prints_the_disk_estimate_and_the_shards_per_rank(capsys):
    assert main(["--cfg", str(DEMO), "--dry-run", "--run.stages", "semi", "--dist.strategy", "fsdp",
                 "--dist.world_size", "4"]) == 0
    out = capsys.readouterr().out
    total, _ = cm.run_disk_bytes(plan_of(("run.stages", "semi"), ("dist.strategy", "fsdp")), 4)
    assert f"disk: the run folder will hold about {cm.human_bytes(total)}" in out
    disk = [line for line in out.splitlines() if line.strip().startswith("disk kept")]
    assert len(disk) == 1 and "rolling checkpoints (2 kept + 1 being written)" in disk[0]
    assert "each rolling checkpoint is 4 shards of" in disk[0]
