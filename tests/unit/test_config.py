"""Config loading: precedence, strictness, clear errors with exit code 2, every recipe dry-runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import load_plan
from engine.errors import ConfigError, UserError
from engine.train import main

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs").glob("*.toml"))

BASE = """
[run]
stages = ["finetune", "semi"]
[model]
arch = "vit_digits_tiny"
img_size = 16
in_chans = 1
num_classes = 10
[data]
source = "digits"
mean = [0.5]
std = [0.5]
batch_size = 8
[optim]
blr = 1e-3
[stages.finetune.optim]
blr = 5e-4
"""


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(BASE)
    return path


def test_defaults_file_and_stage_tables(cfg_file):
    plan = load_plan(cfg_file)
    assert plan.stages["finetune"].optim.blr == 5e-4  # stage table beats the top level
    assert plan.stages["semi"].optim.blr == 1e-3  # top level beats the default
    assert plan.stages["semi"].semi.threshold == 0.6  # untouched default


def test_command_line_beats_file(cfg_file):
    plan = load_plan(cfg_file, [("optim.blr", "3e-3"), ("stages.finetune.optim.blr", "7e-4"),
                                ("semi.threshold", "0.8"), ("augment.crop_scale", "0.2,1.0")])
    assert plan.stages["semi"].optim.blr == 3e-3
    assert plan.stages["finetune"].optim.blr == 7e-4
    assert plan.stages["semi"].semi.threshold == 0.8
    assert plan.stages["semi"].augment.crop_scale == [0.2, 1.0]


@pytest.mark.parametrize("override, key, fragment", [
    (("optim.bl", "1e-3"), "optim.bl", "did you mean 'optim.blr'"),
    (("semi.treshold", "0.5"), "semi.treshold", "did you mean 'semi.threshold'"),
    (("stages.semi.optim.layer_decy", "0.7"), "stages.semi.optim.layer_decy", "layer_decay"),
    (("semi.threshold", "1.5"), "semi.threshold", "(0, 1]"),
    (("semi.threshold", "0"), "semi.threshold", "(0, 1]"),
    (("data.batch_size", "-4"), "data.batch_size", "> 0"),
    (("optim.blr", "fast"), "optim.blr", "expected a number"),
    (("model.attn_backend", "flash"), "model.attn_backend", "sdpa"),
    (("run.host_memory", "pooled"), "run.host_memory", "keep"),
])
def test_bad_values_name_the_key(cfg_file, override, key, fragment):
    with pytest.raises(ConfigError) as err:
        load_plan(cfg_file, [override])
    assert err.value.key == key
    assert fragment in str(err.value)


def test_typo_in_file_is_named(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text(BASE + "\n[semi]\nlamda_u = 3.0\n")
    with pytest.raises(ConfigError, match=r"semi.lamda_u: unknown key; did you mean 'semi.lambda_u'"):
        load_plan(path)


def test_wrong_type_in_file(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(BASE.replace("batch_size = 8", 'batch_size = "eight"'))
    with pytest.raises(ConfigError, match="data.batch_size: expected an integer"):
        load_plan(path)


def test_odd_unlabelled_batch_with_pseudo_mixup(cfg_file):
    with pytest.raises(ConfigError, match="must be even"):
        load_plan(cfg_file, [("data.batch_size", "3"), ("semi.mu", "5")])
    load_plan(cfg_file, [("data.batch_size", "3"), ("semi.mu", "5"), ("semi.pseudo_mixup", "false")])


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_plan(tmp_path / "nope.toml")


def test_cli_exit_code_2_and_one_line(cfg_file, capsys):
    assert main(["--cfg", str(cfg_file), "--optim.bl", "1e-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optim.bl" in err[0] and "optim.blr" in err[0]
    assert main(["--cfg", str(cfg_file), "--data.root"]) == 2  # flag without value


def test_cli_missing_config_file(tmp_path, capsys):
    assert main(["--cfg", str(tmp_path / "missing.toml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_written_config_round_trips(cfg_file, tmp_path):
    plan = load_plan(cfg_file, [("semi.threshold", "0.9")])
    out = tmp_path / "resolved.toml"
    out.write_text(plan.to_toml())
    again = load_plan(out)
    assert again.stages == plan.stages


def test_dry_run_numbers_for_b16_1pct(capsys):
    assert main(["--cfg", str(ROOT / "configs" / "b16_1pct.toml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "86.57 M" in out or "86.5" in out
    assert "128 global" in out  # 8 GPUs x 16
    assert "640 global" in out  # mu = 5
    assert "0.0005" in out  # 1e-3 x 128 / 256


def test_h14_10pct_accumulates(capsys):
    assert main(["--cfg", str(ROOT / "configs" / "h14_10pct.toml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "128 global" in out  # 32 GPUs x 2 x accum 2
    assert "0.00125" in out  # 2.5e-3 x 128 / 256




@pytest.mark.parametrize("written, mode", [("true", "model"), ("false", "off"), ('"step"', "step"),
                                           ('"model"', "model"), ('"off"', "off")])
def test_run_compile_takes_a_mode_and_the_old_booleans_as_aliases(tmp_path, written, mode):
    path = tmp_path / "c.toml"
    path.write_text(BASE.replace("[run]\n", f"[run]\ncompile = {written}\n"))
    assert load_plan(path).stages["semi"].run.compile == mode
    assert load_plan(path, [("run.compile", written.strip('"'))]).stages["semi"].run.compile == mode


@pytest.mark.parametrize("overrides, fragment", [
    ([("run.compile", "stp")], "did you mean 'step'"),
    ([("run.compile", "step"), ("run.kernels", "reference")], "cannot trace run.kernels = reference"),
    ([("run.cuda_graphs", "true")], "set --run.compile step as well"),
])
def test_impossible_compile_settings_name_the_key_and_the_fix(cfg_file, overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_plan(cfg_file, overrides)


def test_cuda_graphs_on_a_cpu_are_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["--out", str(out), "--run.device", "cpu", "--run.compile", "step", "--run.cuda_graphs", "true"])
    assert code == 2
    assert "run.cuda_graphs = true needs a CUDA device" in capsys.readouterr().err
    assert not (out / "config.toml").exists()


def test_dry_run_states_the_compile_mode_and_what_cuda_graphs_hold(capsys):
    assert main(["--cfg", str(ROOT / "configs" / "h14_1pct.toml"), "--dry-run", "--run.compile", "step",
                 "--run.cuda_graphs", "true"]) == 0
    out = capsys.readouterr().out
    assert "run.compile = step: torch.compile of the whole micro-step" in out and "replayed as a CUDA graph" in out
    assert "CUDA graphs       hold the step's activations" in out
    assert main(["--cfg", str(ROOT / "configs" / "h14_1pct.toml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "run.compile = off: eager" in out and "CUDA graphs       hold" not in out
