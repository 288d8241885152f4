"""The ablation runner without training: variant parsing and its errors, the runs it plans and the engine
overrides they become, the table (mean, std, collapse) from fake run folders, the RESULTS.md section, the
plot, the resume logic (finished runs are read, not redone; one MAE per seed) and runs in parallel."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bench import ablations
from bench.ablations_sweep import Run, Sweep, plan_runs, run_overrides
from bench.ablations_table import (
    BEGIN,
    END,
    budget_table,
    plot,
    replace_section,
    run_record,
    scaling_table,
    teacher_history,
    write_svg,
)
from bench.ablations_variants import (
    BUILT_IN,
    parse_common,
    parse_variant,
    scaling_variants,
    select_variants,
    shares_finetune,
)
from engine.errors import UserError


def fake_run(folder: Path, stage: str, history: list[tuple[int, float]], final: float | None = None) -> Path:
    """A finished run folder: metrics.jsonl with one eval row per (step, teacher top-1), results.json whose
    scored stage ends at `final` (default: the last eval)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"stage": "finetune", "kind": "eval", "step": 1, "teacher_top1": 99.0, "top1": 99.0}]  # another stage
    rows += [{"stage": stage, "kind": "train", "step": s, "loss": 1.0} for s, _ in history]
    rows += [{"stage": stage, "kind": "eval", "step": s, "top1": v - 1, "teacher_top1": v} for s, v in history]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = history[-1][1] if final is None else final
    results = {"stages": {stage: {"top1": final - 1, "teacher_top1": final}}, "wall_seconds": 12.5}
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def record(tmp_path: Path, variant: str, budget: int, seed: int, history, final=None, arch="vit_digits_tiny"):
    run_dir = fake_run(tmp_path / f"{variant}-{budget}-{seed}-{arch}", "semi", history, final)
    return run_record(run_dir, {"variant": variant, "budget": budget, "seed": seed, "arch": arch}, "semi")


# variants


def test_a_variant_is_a_name_and_comma_separated_overrides_whose_list_values_keep_their_commas():
    v = parse_variant("strict=--semi.threshold=0.9,--augment.crop_scale=0.5,1.0,--semi.lambda_u=1")
    assert v.name == "strict"
    assert v.overrides == (("semi.threshold", "0.9"), ("augment.crop_scale", "0.5,1.0"), ("semi.lambda_u", "1"))
    assert v.stages == ("finetune", "semi") and v.scored == "semi"


def test_a_variant_picks_its_stages_with_run_stages_and_is_scored_on_the_last():
    v = parse_variant("scratch=--run.stages=baseline")
    assert v.stages == ("baseline",) and v.scored == "baseline" and v.overrides == ()
    assert parse_variant("both=--run.stages=[finetune, semi]").stages == ("finetune", "semi")


def test_the_built_in_variants_change_what_the_issue_names():
    assert BUILT_IN["supervised"].stages == ("finetune",)
    assert BUILT_IN["semivit"].overrides == ()
    assert BUILT_IN["fixmatch"].overrides == (("stages.semi.ema.decay", "0"),)
    assert BUILT_IN["hard"].overrides == (("stages.semi.semi.pseudo_mixup", "false"),)
    assert BUILT_IN["decay0.9"].overrides == (("stages.semi.ema.decay", "0.9"),)
    assert BUILT_IN["decay0.999"].overrides == (("stages.semi.ema.decay", "0.999"),)


@pytest.mark.parametrize("text, says", [
    ("strict", "no '=' after the name"),
    ("a b=--semi.mu=2", "the name 'a b'"),
    ("x=semi.mu=2", "'semi.mu=2' is not an override"),
    ("x=--semi.mu", "has no value: write --semi.mu=VALUE"),
    ("x=--run.seed=3", "--run.seed is set by the grid (--seeds)"),
    ("x=--data.labels_per_class=3", "set by the grid (--budgets)"),
    ("x=--model.init=a.pt", "set by the grid (the shared MAE pre-training)"),
    ("x=--run.stages=pretrain", "a variant runs some of baseline, finetune, semi"),
])
def test_a_malformed_variant_is_refused_naming_the_problem_and_the_syntax(text, says):
    with pytest.raises(UserError) as err:
        parse_variant(text)
    assert says in str(err.value) and "write NAME=--key=value" in str(err.value)


def test_variant_names_must_be_unique_and_built_in_names_known():
    with pytest.raises(UserError, match="the name 'hard' is taken"):
        select_variants(None, ["hard=--semi.mu=2"])
    with pytest.raises(UserError, match="the name 'x' is taken"):
        select_variants(["semivit"], ["x=--semi.mu=2", "x=--semi.mu=4"])
    with pytest.raises(UserError, match="unknown variant.*fixmath.*fixmatch"):
        select_variants(["fixmath"], [])
    chosen = select_variants(["semivit", "hard"], ["strict=--semi.threshold=0.9"])
    assert [v.name for v in chosen] == ["semivit", "hard", "strict"]
    assert [v.name for v in select_variants(None, [])] == list(BUILT_IN)


def test_common_overrides_take_the_same_syntax_but_no_stages():
    assert parse_common("--stages.semi.schedule.epochs=60,--run.threads=2") == (
        ("stages.semi.schedule.epochs", "60"), ("run.threads", "2"))
    assert parse_common("") == ()
    with pytest.raises(UserError, match="--common.*belongs to a variant"):
        parse_common("--run.stages=semi")


def test_a_bad_variant_exits_2_before_any_run(tmp_path, capsys):
    assert ablations.main(["--out", str(tmp_path), "--variant", "x=--semi.treshold=0.9"]) == 2
    err = capsys.readouterr().err
    assert "variant 'x'" in err and "did you mean 'semi.threshold'" in err
    assert ablations.main(["--out", str(tmp_path), "--variant", "x"]) == 2
    assert "no '=' after the name" in capsys.readouterr().err
    assert ablations.main(["--out", str(tmp_path), "--budgets", "0"]) == 2
    assert "labels per class must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# the runs and their commands


def test_each_run_starts_from_its_seeds_mae_with_its_budget_and_the_variant_overriding_the_common_keys(tmp_path):
    run = Run(BUILT_IN["fixmatch"], budget=2, seed=1)
    overrides = run_overrides(run, tmp_path, (("stages.semi.ema.decay", "0.5"),))
    keys = dict(overrides)
    assert keys["model.init"] == str(tmp_path / "mae-seed1" / "checkpoints" / "pretrain-final.pt")
    assert keys["run.stages"] == "finetune,semi" and keys["data.labels_per_class"] == "2"
    assert keys["run.seed"] == keys["data.split_seed"] == "1"
    assert keys["stages.semi.ema.decay"] == "0"  # the later override wins in the engine, as the dict shows
    small = Run(BUILT_IN["supervised"], 2, 0, "vit_digits_small")
    keys = dict(run_overrides(small, tmp_path, ()))
    assert keys["model.arch"] == "vit_digits_small" and keys["run.stages"] == "finetune"
    assert keys["model.init"].endswith("mae-seed0-vit_digits_small/checkpoints/pretrain-final.pt")


DEMO = Path(__file__).resolve().parents[2] / "configs" / "digits.toml"


def test_variants_that_fine_tune_as_the_recipe_share_the_fine_tune_and_a_change_reaching_it_does_not():
    assert all(shares_finetune(str(DEMO), v, ()) for v in BUILT_IN.values())
    assert shares_finetune(str(DEMO), parse_variant("scoped=--stages.semi.semi.threshold=0.9"), ())
    for text in ("lr=--optim.lr=1e-3", "wide=--semi.threshold=0.9", "scratch=--run.stages=baseline,semi"):
        assert not shares_finetune(str(DEMO), parse_variant(text), ()), text


def test_a_sharing_run_trains_its_later_stages_from_the_shared_fine_tune_and_supervised_is_that_fine_tune(tmp_path):
    semi = Run(BUILT_IN["semivit"], budget=2, seed=1, shares_finetune=True)
    keys = dict(run_overrides(semi, tmp_path, ()))
    assert keys["run.stages"] == "semi" and keys["data.labels_per_class"] == "2" and keys["run.seed"] == "1"
    assert keys["model.init"] == str(tmp_path / "finetune-l2-s1" / "checkpoints" / "finetune-final.pt")
    supervised = Run(BUILT_IN["supervised"], budget=2, seed=1, shares_finetune=True)
    keys = dict(run_overrides(supervised, tmp_path, ()))
    assert keys["run.stages"] == "finetune"
    assert keys["model.init"] == str(tmp_path / "mae-seed1" / "checkpoints" / "pretrain-final.pt")
    sweep = Sweep(tmp_path / "cfg.toml", tmp_path, ())
    assert sweep.run_dir(supervised) == tmp_path / "finetune-l2-s1"
    assert sweep.run_dir(semi) == tmp_path / "runs" / "semivit-l2-s1"


def test_the_scaling_runs_of_the_configs_own_model_are_the_grids_runs():
    variants = [BUILT_IN["supervised"], BUILT_IN["semivit"]]
    runs = plan_runs(variants, [1, 2], [0, 1], ["vit_digits_tiny", "vit_digits_small"], 2, "vit_digits_tiny")
    names = [r.name for r in runs]
    assert len(names) == len(set(names)) == 2 * 2 * 2 + 2 * 2
    assert names[:4] == ["supervised-l1-s0", "semivit-l1-s0", "supervised-l2-s0", "semivit-l2-s0"]
    assert "semivit-l2-s1-vit_digits_small" in names and "semivit-l1-s0-vit_digits_small" not in names


def test_the_model_size_runs_can_take_fewer_variants_than_the_grid():
    grid = [BUILT_IN["supervised"], BUILT_IN["semivit"], BUILT_IN["hard"]]
    chosen = scaling_variants(["semivit", "supervised"], grid)
    assert [v.name for v in chosen] == ["semivit", "supervised"] and scaling_variants(None, grid) == grid
    runs = plan_runs(grid, [2], [0], ["vit_digits_small"], 2, "vit_digits_tiny", chosen)
    assert [r.name for r in runs if r.arch] == ["semivit-l2-s0-vit_digits_small", "supervised-l2-s0-vit_digits_small"]
    with pytest.raises(UserError, match="--scaling-variants: fixmatch not in the grid's variants"):
        scaling_variants(["fixmatch"], grid)


# the table


def test_the_teacher_history_is_its_stages_evaluations_by_step_the_last_of_a_repeated_step_kept(tmp_path):
    run_dir = fake_run(tmp_path / "r", "semi", [(10, 50.0), (20, 70.0), (20, 72.0), (30, 60.0)])
    assert teacher_history(run_dir, "semi") == [(10, 50.0), (20, 72.0), (30, 60.0)]
    assert teacher_history(tmp_path / "nothing", "semi") == []


def test_a_run_whose_teacher_ends_more_than_5_points_below_its_peak_has_collapsed(tmp_path):
    fell = record(tmp_path, "fixmatch", 1, 0, [(10, 80.0), (20, 90.0), (30, 84.9)])
    held = record(tmp_path, "semivit", 1, 0, [(10, 80.0), (20, 90.0), (30, 85.0)])
    assert fell["collapsed"] and fell["peak_teacher_top1"] == 90.0 and fell["teacher_top1"] == 84.9
    assert not held["collapsed"]
    assert fell["teacher_history"] == [[10, 80.0], [20, 90.0], [30, 84.9]]
    assert fell["student_top1"] == pytest.approx(83.9) and fell["wall_seconds"] == 12.5


def test_the_table_shows_mean_and_std_over_seeds_and_counts_collapses(tmp_path):
    records = [record(tmp_path, "semivit", 1, s, [(10, v)]) for s, v in enumerate((90.0, 92.0, 94.0))]
    records += [record(tmp_path, "fixmatch", 1, 0, [(10, 95.0), (20, 80.0)]),
                record(tmp_path, "fixmatch", 1, 1, [(10, 90.0)]),
                record(tmp_path, "fixmatch", 2, 0, [(10, 97.0)])]
    table = budget_table(records, ["semivit", "fixmatch"], [1, 2]).splitlines()
    assert table[0] == "| variant | labels/class 1 | labels/class 2 | collapsed |"
    assert table[2] == "| semivit | 92.0 ± 2.0 | — | 0 of 3 |"
    assert table[3] == "| fixmatch | 85.0 ± 7.1 (1 collapsed) | 97.0 | 1 of 3 |"


def test_the_scaling_table_has_a_column_per_model(tmp_path):
    records = [record(tmp_path, "semivit", 2, 0, [(10, 90.0)], arch="vit_digits_tiny"),
               record(tmp_path, "semivit", 2, 0, [(10, 93.0)], arch="vit_digits_small")]
    table = scaling_table(records, ["semivit"], ["vit_digits_tiny", "vit_digits_small"]).splitlines()
    assert table[0] == "| variant | vit_digits_tiny | vit_digits_small | collapsed |"
    assert table[2] == "| semivit | 90.0 | 93.0 | 0 of 2 |"


def test_the_results_section_is_replaced_between_its_markers_not_duplicated(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nbefore\n")
    replace_section(md, "## Ablations\n\nfirst")
    md.write_text(md.read_text() + "\n## Later section\n")
    replace_section(md, "## Ablations\n\nsecond")
    text = md.read_text()
    assert text.count(BEGIN) == text.count(END) == 1
    assert "second" in text and "first" not in text
    assert text.startswith("# Results\n\nbefore\n") and text.rstrip().endswith("## Later section")
    replace_section(tmp_path / "new.md", "alone")
    assert (tmp_path / "new.md").read_text() == f"{BEGIN}\nalone\n{END}\n"


def test_the_plot_is_a_png_and_the_fallback_an_svg_with_a_line_per_variant(tmp_path):
    records = [record(tmp_path, v, b, s, [(10, 80.0 + b + s)]) for v in ("semivit", "hard") for b in (1, 2)
               for s in (0, 1)]
    png = plot(records, ["semivit", "hard"], [1, 2], tmp_path / "ablations.png")
    assert png.suffix == ".png" and png.read_bytes().startswith(b"\x89PNG")
    svg = write_svg({"semivit": [(1, 81.5, 0.7), (2, 82.5, 0.7)], "hard": [(1, 81.5, 0.7)]}, [1, 2],
                    tmp_path / "ablations.svg")
    text = svg.read_text()
    assert text.count("<polyline") == 2 and ">semivit</text>" in text and ">hard</text>" in text


# resume


class FakeEngine:
    """Stands in for run_engine: records each call and leaves a finished run folder behind."""

    def __init__(self):
        self.calls: list[Path] = []

    def __call__(self, cfg: Path, out: Path, overrides) -> None:
        self.calls.append(out)
        stages = dict(overrides)["run.stages"].split(",")
        fake_run(out, stages[-1], [(10, 80.0 + len(self.calls))])


def test_a_finished_run_is_read_not_redone_and_each_seed_pre_trains_once(tmp_path):
    variants = [BUILT_IN["supervised"], BUILT_IN["semivit"]]
    runs = plan_runs(variants, [1, 2], [0, 1], [], 2, "vit_digits_tiny")
    engine = FakeEngine()
    sweep = Sweep(tmp_path / "cfg.toml", tmp_path, (), execute=engine, cfg_arch="vit_digits_tiny")
    fake_run(sweep.run_dir(runs[1]), "semi", [(10, 91.0)])  # finished by an earlier, killed sweep
    assert len(sweep.pending(runs)) == len(runs) - 1
    records = sweep.run_all(runs)
    assert runs[1].name not in {p.name for p in engine.calls}
    assert [p.name for p in engine.calls if p.name.startswith("mae")] == ["mae-seed0", "mae-seed1"]
    assert len(engine.calls) == 2 + len(runs) - 1
    assert records[1]["teacher_top1"] == 91.0 and [r["name"] for r in records] == [r.name for r in runs]
    assert json.loads((tmp_path / "results" / f"{runs[1].name}.json").read_text())["teacher_top1"] == 91.0

    again = FakeEngine()
    Sweep(tmp_path / "cfg.toml", tmp_path, (), execute=again, cfg_arch="vit_digits_tiny").run_all(runs)
    assert again.calls == []


class TimedFakeEngine(FakeEngine):
    """A fake run that takes a moment, logging when each one started and ended (from several threads)."""

    def __init__(self, interrupt: str = ""):
        super().__init__()
        self.events: list[tuple[str, str]] = []
        self.interrupt = interrupt

    def __call__(self, cfg: Path, out: Path, overrides) -> None:
        self.events.append(("start", out.name))
        time.sleep(0.05)
        if out.name == self.interrupt:
            raise KeyboardInterrupt  # what run_engine raises when its run was stopped and saved
        super().__call__(cfg, out, overrides)
        self.events.append(("end", out.name))


def test_two_jobs_run_two_at_a_time_and_no_run_starts_before_its_seeds_mae_ended(tmp_path):
    variants = [BUILT_IN["supervised"], BUILT_IN["semivit"], BUILT_IN["hard"]]
    runs = plan_runs(variants, [1, 2], [0, 1], [], 2, "vit_digits_tiny")
    engine = TimedFakeEngine()
    records = Sweep(tmp_path / "cfg.toml", tmp_path, (), execute=engine, cfg_arch="vit_digits_tiny",
                    jobs=2).run_all(runs)
    assert [r["name"] for r in records] == [r.name for r in runs]  # in plan order, whatever finished first
    order = [f"{what} {name}" for what, name in engine.events]
    assert order[:2] == ["start mae-seed0", "start mae-seed1"]  # nothing else can start before them
    for run in runs:
        assert order.index(f"end mae-seed{run.seed}") < order.index(f"start {run.name}")
    at_once = running = 0
    for what, _ in engine.events:
        running += 1 if what == "start" else -1
        at_once = max(at_once, running)
    assert at_once == 2 and len(engine.calls) == 2 + len(runs)


def test_with_sharing_each_seed_and_budget_fine_tunes_once_before_its_runs_and_supervised_trains_nothing(tmp_path):
    variants = [BUILT_IN["supervised"], BUILT_IN["semivit"], BUILT_IN["hard"]]
    runs = plan_runs(variants, [1, 2], [0, 1], [], 2, "vit_digits_tiny", sharing=frozenset(BUILT_IN))
    engine = TimedFakeEngine()
    records = Sweep(tmp_path / "cfg.toml", tmp_path, (), execute=engine, cfg_arch="vit_digits_tiny",
                    jobs=2).run_all(runs)
    trained = [p.name for p in engine.calls]
    assert sorted(n for n in trained if n.startswith("finetune")) == [
        "finetune-l1-s0", "finetune-l1-s1", "finetune-l2-s0", "finetune-l2-s1"]
    assert not any(n.startswith("supervised") for n in trained) and len(trained) == 2 + 4 + 8
    order = [f"{what} {name}" for what, name in engine.events]
    for run in runs:
        assert order.index(f"end mae-seed{run.seed}") < order.index(f"start {run.finetune.name}")
        if run.stages:
            assert order.index(f"end {run.finetune.name}") < order.index(f"start {run.name}")
    by_name = {r["name"]: r for r in records}
    assert by_name["supervised-l2-s1"]["run_dir"] == str(tmp_path / "finetune-l2-s1")
    assert by_name["supervised-l2-s1"]["scored_stage"] == "finetune"
    assert by_name["hard-l2-s1"]["shared_finetune"] == str(tmp_path / "finetune-l2-s1")


def test_an_interrupted_run_stops_the_sweep_and_the_others_end_before_it_returns(tmp_path):
    runs = plan_runs([BUILT_IN["supervised"], BUILT_IN["semivit"]], [1, 2], [0], [], 2, "vit_digits_tiny")
    engine = TimedFakeEngine(interrupt=runs[1].name)
    sweep = Sweep(tmp_path / "cfg.toml", tmp_path, (), execute=engine, cfg_arch="vit_digits_tiny", jobs=2)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_all(runs)
    started = [name for what, name in engine.events if what == "start"]
    ended = [name for what, name in engine.events if what == "end"]
    assert set(started) - set(ended) == {runs[1].name}  # every other run that started also ended
    assert len(started) < 1 + len(runs)  # and nothing started after the interruption
    assert sweep.pending(runs)  # a rerun continues from here


def test_on_a_cpu_the_cores_go_to_separate_runs_of_one_thread_unless_told_otherwise(monkeypatch):
    monkeypatch.setattr(ablations.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(ablations.torch.cuda, "is_available", lambda: False)
    args = ablations.parse_args([])
    assert ablations.parallel_runs(args, "auto", ()) == (8, (("run.threads", "1"),))
    assert ablations.parallel_runs(ablations.parse_args(["--jobs", "2"]), "cpu", ()) == (2, (("run.threads", "4"),))
    assert ablations.parallel_runs(args, "cpu", (("run.threads", "3"),)) == (8, ())
    assert ablations.parallel_runs(args, "cuda", ()) == (1, ())
    assert ablations.main(["--jobs", "0"]) == 2
