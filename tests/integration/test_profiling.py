"""Named phases, the step profiler (--profile.steps) and input-bound detection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine import profiling
from engine.config import LoggingConfig, load_plan
from engine.metrics import MetricLogger
from engine.runtime import Runtime
from engine.session import run_plan
from engine.train import main

DEMO = Path(__file__).resolve().parents[2] / "configs" / "digits.toml"
FAST = [("logging.progress", "false"), ("logging.tensorboard", "false"), ("run.threads", "1"),
        ("run.stages", "semi"), ("checkpoint.export_safetensors", "false")]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_profile_three_demo_steps_phases_sum_to_the_step(tmp_path):
    out = tmp_path / "prof"
    plan = load_plan(DEMO, [*FAST, ("schedule.max_steps", "4"), ("logging.every_steps", "10"),
                            ("profile.steps", "3"), ("profile.wait", "0"), ("profile.warmup", "1")])
    run_plan(plan, out)
    table = json.loads((out / "results.json").read_text())["stages"]["semi"]["profile"]
    assert table["steps"] == 3
    method = ["data", "teacher_forward", "pseudo_label", "pseudo_mixup", "student_forward_backward",
              "optimizer", "ema"]
    assert list(table["phases"]) == method  # every step of the method, in its order
    covered = sum(v["ms"] for v in table["phases"].values())
    assert covered == pytest.approx(table["step_ms"], rel=0.10)
    assert sum(v["share"] for v in table["phases"].values()) == pytest.approx(1.0, abs=0.10)
    trace = json.loads((out / table["trace"]).read_text())
    assert any(e.get("name") == "teacher_forward" for e in trace["traceEvents"])
    assert "## Profile: semi" in (out / "report.md").read_text()
    assert not profiling.SWITCHES.record  # the window closed: the ranges are free again


def test_phases_cost_nothing_when_profiling_is_off():
    assert not (profiling.SWITCHES.nvtx or profiling.SWITCHES.record)
    assert profiling.phase("data") is profiling.phase("ema")  # one shared no-op context, no allocation


def test_nvtx_ranges_read_like_the_method(tmp_path, monkeypatch):
    pushed = []
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: pushed.append(name))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: None)
    run_plan(load_plan(DEMO, [*FAST, ("schedule.max_steps", "1"), ("profile.nvtx", "true")]), tmp_path / "n")
    assert pushed[:7] == ["data", "teacher_forward", "pseudo_label", "pseudo_mixup", "student_forward_backward",
                          "optimizer", "ema"]
    assert "eval" in pushed and "checkpoint" in pushed
    assert not profiling.SWITCHES.nvtx  # switched off again when the stage ends


def test_bad_profile_value_is_a_one_line_error(capsys):
    assert main(["--profile.steps", "-1", "--dry-run"]) == 2
    assert "profile.steps: must be >= 0" in capsys.readouterr().err


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_input_bound_window_warns_once_and_logs_data_wait(tmp_path, monkeypatch, capsys):
    clock = FakeClock()
    monkeypatch.setattr("engine.metrics.time", clock)
    rt = Runtime(device=torch.device("cpu"), dtype=None)
    logger = MetricLogger(tmp_path, rt, LoggingConfig(tensorboard=False), "semi", hint="raise data.num_workers")
    logger.start(0)

    def window(first_step, steps, wait_ms, step_ms):
        for _ in range(steps):
            logger.accumulate({"loss": torch.tensor(1.0)}, images=10, data_wait=wait_ms / 1e3)
            clock.now += step_ms / 1e3
        return logger.flush(first_step + steps, 0.0, {})

    first = window(0, 4, wait_ms=50, step_ms=100)  # start-up window: exempt
    assert first["data_wait_ms"] == pytest.approx(50) and first["step_ms"] == pytest.approx(100)
    assert first["img_per_s"] == pytest.approx(100)
    assert "input-bound" not in capsys.readouterr().out
    window(4, 4, wait_ms=20, step_ms=100)  # 20 % waiting: warn
    assert capsys.readouterr().out.count("input-bound: waited for data 20 %") == 1
    window(8, 4, wait_ms=20, step_ms=100)  # still input-bound: no repeat
    window(12, 4, wait_ms=5, step_ms=100)  # 5 %: fine
    assert "input-bound" not in capsys.readouterr().out
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [round(r["data_wait_ms"]) for r in rows] == [50, 20, 20, 5]


def test_phase_table_uses_host_ranges_and_the_profiler_step():
    from types import SimpleNamespace

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def ev(name, us, device=cpu):
        return SimpleNamespace(name=name, cpu_time_total=us, device_type=device)

    events = [ev("ProfilerStep#3", 10_000), ev("ProfilerStep#4", 14_000), ev("data", 2_000), ev("data", 2_000),
              ev("student_forward_backward", 18_000), ev("student_forward_backward", 99_000, cuda),  # GPU-side copy
              ev("aten::mm", 5_000)]
    table = profiling.phase_table(events, steps=2)
    assert table["steps"] == 2 and table["step_ms"] == 12.0
    assert table["phases"] == {"data": {"ms": 2.0, "share": 0.1667},
                               "student_forward_backward": {"ms": 9.0, "share": 0.75}}
    assert table["other_ms"] == 1.0
    assert "| **step** | **12.00** | 100 % |" in profiling.format_table(table)
