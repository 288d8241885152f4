"""Using a trained model: engine.predict on image files, pseudo-label export, and their bad-input errors."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from engine import predict, pseudo_label
from engine.config import load_plan
from engine.inference import load_classifier
from engine.models.build import build_model
from engine.session import run_plan

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "digits.toml"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short demo run folder (finetune + semi, a few steps): config.toml, model.safetensors, checkpoints."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run")
    plan = load_plan(DEMO, [("run.stages", "finetune,semi"), ("schedule.max_steps", "6"),
                            ("logging.progress", "false"), ("logging.tensorboard", "false"), ("run.threads", "1")])
    run_plan(plan, out)
    return out


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory):
    """The first test digits as 8x8 greyscale PNGs (what a user would have on disk), with their labels."""
    from dataloading.digits import _load, split_indices

    cfg = load_plan(DEMO, []).base
    raw, targets = _load()
    test_ids = split_indices(cfg.data).test[:12]
    folder = tmp_path_factory.mktemp("digits")
    for i in test_ids:
        Image.fromarray(np.round(raw[i] * 255).astype(np.uint8), mode="L").save(folder / f"d{i:04d}.png")
    return folder, test_ids


def test_predict_files_match_the_in_memory_evaluation_view(run, digit_files):
    from dataloading.digits import _load, preprocess

    folder, ids = digit_files
    cfg = load_plan(run / "config.toml", []).base
    rows = predict.predict(predict.collect([str(folder)]), cfg, str(run / "model.safetensors"), batch_size=5)
    assert [Path(r["file"]).name for r in rows] == [f"d{i:04d}.png" for i in ids]
    model, what = load_classifier(run / "model.safetensors", cfg, torch.device("cpu"))
    raw, _ = _load()
    with torch.no_grad():
        probs = model(preprocess(torch.from_numpy(raw[ids]).unsqueeze(1), 16, [0.5], [0.5])).softmax(-1)
    top, idx = probs.topk(5, dim=1)
    for r, p, i in zip(rows, top.tolist(), idx.tolist()):
        assert len(r["classes"]) == 5 and r["probs"] == sorted(r["probs"], reverse=True)
        assert r["classes"][0] == str(i[0])
        np.testing.assert_allclose(r["probs"], p, atol=2e-3)  # 8-bit files vs float digits


def test_predict_cli_prints_a_table_and_writes_csv(run, digit_files, capsys, tmp_path):
    folder, ids = digit_files
    one = sorted(folder.iterdir())[0]
    out = tmp_path / "pred.csv"
    code = predict.main(["--checkpoint", str(run / "checkpoints" / "semi-final.pt"), "--cfg",
                         str(run / "config.toml"), str(one), str(folder), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed and one.name in printed
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1 + len(ids)
    assert set(rows[0]) == {"file"} | {f"{k}_{j}" for j in range(1, 6) for k in ("class", "prob")}
    assert abs(sum(float(rows[0][f"prob_{j}"]) for j in range(1, 6)) - 1.0) < 0.5


def test_predict_bad_input_names_it_and_exits_2(run, digit_files, capsys, tmp_path):
    folder, _ = digit_files
    base = ["--checkpoint", str(run / "model.safetensors"), "--cfg", str(run / "config.toml")]
    missing = tmp_path / "nope.png"
    assert predict.main(base + [str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert predict.main(base + [str(text)]) == 2
    err = capsys.readouterr().err
    assert str(text) in err and "not a readable image" in err
    # a checkpoint of another class count, then one without a classifier head (MAE-like)
    cfg = load_plan(run / "config.toml", []).base
    other = build_model(cfg.model.__class__(**{**cfg.model.__dict__, "num_classes": 7}))
    save_file(other.state_dict(), str(tmp_path / "seven.safetensors"))
    assert predict.main(["--checkpoint", str(tmp_path / "seven.safetensors"), "--cfg", str(run / "config.toml"),
                         str(folder)]) == 2
    err = capsys.readouterr().err
    assert "seven.safetensors" in err and "head.weight" in err and "(7, 64)" in err
    headless = {k: v for k, v in load_file(str(run / "model.safetensors")).items() if not k.startswith("head.")}
    save_file(headless, str(tmp_path / "headless.safetensors"))
    assert predict.main(["--checkpoint", str(tmp_path / "headless.safetensors"), "--cfg", str(run / "config.toml"),
                         str(folder)]) == 2
    assert "lacks head.weight" in capsys.readouterr().err
    assert predict.main(["--checkpoint", str(tmp_path / "gone.pt"), "--cfg", str(run / "config.toml"),
                         str(folder)]) == 2
    assert "gone.pt" in capsys.readouterr().err


def test_pseudo_label_cli_writes_the_unlabelled_pool(run, capsys):
    out = run / "pl.csv"
    code = pseudo_label.main(["--cfg", str(run / "config.toml"), "--checkpoint", str(run / "model.safetensors"),
                              "--out", str(out), "--threshold", "0.15"])
    assert code == 0
    assert "1207 pseudo labels" in capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == pseudo_label.COLUMNS
    from dataloading.digits import split_indices

    cfg = load_plan(run / "config.toml", []).base
    assert [int(r["index"]) for r in rows] == split_indices(cfg.data).unlabelled.tolist()
    for r in rows:
        assert (float(r["confidence"]) >= 0.15) == (r["accepted"] == "1")
        assert r["class_name"] == r["label"] and int(r["true_label"]) in range(10)


def test_pseudo_label_stage_uses_the_previous_teacher(tmp_path):
    plan = load_plan(DEMO, [("run.stages", "finetune,pseudo_label"), ("schedule.max_steps", "2"),
                            ("logging.progress", "false"), ("logging.tensorboard", "false"), ("run.threads", "1")])
    results = run_plan(plan, tmp_path)
    s = results["stages"]["pseudo_label"]
    assert s["pseudo_labels"] == 1207 and 0 <= s["accept_rate"] <= 100
    rows = list(csv.DictReader((tmp_path / "pseudo_labels.csv").open()))
    assert len(rows) == 1207


def test_pseudo_label_on_image_folders_lists_paths_and_marks_unreadable_files(tmp_path):
    from engine.pseudo_label import pool_batches

    for split, count in (("train", 6), ("val", 2)):
        for c in range(2):
            d = tmp_path / "data" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((20, 20, 3), 40 + 100 * c, np.uint8)).save(d / f"img{i}.png")
    for i in range(6):  # every class1 train file is broken (whichever the split leaves unlabelled)
        (tmp_path / "data" / "train" / "class1" / f"img{i}.png").write_bytes(b"broken")
    plan = load_plan(ROOT / "configs" / "b16_10pct.toml", [
        ("model.arch", "vit_tiny_patch16"), ("model.img_size", "32"), ("model.num_classes", "2"),
        ("data.root", str(tmp_path / "data")), ("data.labelled_index", ""), ("data.unlabelled_index", ""),
        ("data.labels_per_class", "2"), ("data.num_workers", "0"), ("model.init", "")])
    batches = list(pool_batches(plan.base, 3))
    paths = [p for _, ps, _, _ in batches for p in ps]
    truth = torch.cat([t for *_, t in batches]).tolist()
    assert len(paths) == 8 and all(p.startswith("class") for p in paths)
    # unreadable: marked -1, never given another image's label
    assert [t for p, t in zip(paths, truth)] == [0 if p.startswith("class0") else -1 for p in paths]
