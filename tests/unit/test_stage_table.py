"""The shape of the training code: stages declare themselves in one table, the loop stays readable."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest

from engine.config import load_plan
from engine.stages.specs import STAGE_SPECS, ReportRow

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "digits.toml"
MAX_FUNCTION_LINES = 60
MAX_STAGE_NAME_COMPARISONS = 3


def modules(folder: str):
    for path in sorted((ROOT / folder).rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def names_a_stage(node: ast.AST) -> bool:
    """A string constant that is a stage's name, alone or inside a tuple / list / set literal."""
    if isinstance(node, ast.Constant):
        return node.value in STAGE_SPECS
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(names_a_stage(item) for item in node.elts)
    return False


def stage_name_comparisons() -> list[str]:
    found = []
    for path, tree in modules("engine"):
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(names_a_stage(n) for n in (node.left, *node.comparators)):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_function_in_engine_stages_is_longer_than_60_lines():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, tree in modules("engine/stages") for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "split these functions:\n" + "\n".join(long)


def test_at_most_three_comparisons_of_stage_names_remain_in_engine():
    found = stage_name_comparisons()
    assert len(found) <= MAX_STAGE_NAME_COMPARISONS, (
        "ask engine.stages.specs instead of comparing stage names:\n" + "\n".join(found))


def test_the_comparison_counter_sees_the_forms_it_counts():
    tree = ast.parse('a == "semi"\nb in ("finetune", "x")\n"pretrain" != c\nd == "other"\n')
    assert sum(isinstance(n, ast.Compare) and any(names_a_stage(x) for x in (n.left, *n.comparators))
               for n in ast.walk(tree)) == 3


def test_no_stage_is_probed_for_optional_methods():
    probes = [f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}"
              for path, tree in modules("engine") for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("hasattr", "getattr") and node.args
              and "stage" in ast.unparse(node.args[0]).lower()]
    assert not probes, "put these in engine.stages.base.Stage:\n" + "\n".join(probes)


def test_every_training_stage_has_a_class_a_model_and_an_epoch_stream():
    for spec in STAGE_SPECS.values():
        if spec.trains:
            assert spec.stage is not None and spec.epoch in spec.streams, spec.name
        if spec.config_from:
            assert spec.config_from in STAGE_SPECS, spec.name


def test_a_new_stage_is_one_row_of_the_table(tmp_path, monkeypatch, one_thread):
    """A linear-probe-like stage borrowed from the fine-tune class: one row, and the config loader, the dry
    run, preflight, the runner and the report all know it."""
    from engine.dryrun import dry_run
    from engine.session import run_plan

    row = dataclasses.replace(STAGE_SPECS["finetune"], name="probe", report=ReportRow("linear probe"))
    monkeypatch.setitem(STAGE_SPECS, "probe", row)
    overrides = [("run.stages", "probe"), ("stages.probe.schedule.max_steps", "2"), ("logging.progress", "false"),
                 ("run.threads", "1")]
    plan = load_plan(DEMO, overrides)
    assert plan.stages["probe"].schedule.max_steps == 2
    assert "[probe] model vit_digits_tiny" in dry_run(plan)
    run_plan(plan, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["stages"]["probe"]["steps"] == 2
    assert (tmp_path / "checkpoints" / "probe-final.pt").is_file()
    assert "linear probe" in (tmp_path / "report.md").read_text()


def test_an_unknown_stage_name_is_a_config_error_naming_the_choices():
    from engine.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_plan(DEMO, [("run.stages", "finetune,semx")])
    assert err.value.key == "run.stages" and "did you mean 'semi'" in str(err.value)
