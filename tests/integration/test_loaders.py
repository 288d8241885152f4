"""Both image-folder loaders (torch, DALI CPU-only): same order from the one sampler, views, small labelled
sets, unreadable files, the exclusion list, and the digits exported as JPEGs trained end to end.

DALI tests skip when DALI is not installed, and fail in CI (which installs it: .ci/run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require_dali
from PIL import Image

from dataloading import build_data
from dataloading.build import resolve_loader
from engine.config.sections import AugmentConfig, DataConfig
from engine.errors import UserError

REPO = Path(__file__).resolve().parents[2]
LOADERS = ["torch", "dali"]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def loader_param(name: str) -> str:
    if name == "dali":
        require_dali()
    return name


def jpeg(path: Path, seed: int, size=(48, 36)) -> None:
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([xx * (3 + seed % 5), yy * 5, (xx + 2 * yy) * 2], -1) + g.integers(0, 40, (1, 1, 3))
    arr = np.clip(base + g.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(path, quality=90)


def make_jpeg_folder(root: Path, per_class: int = 8, classes=("a", "b", "c"), val_per_class: int = 3) -> Path:
    k = 0
    for c in classes:
        for i in range(per_class):
            jpeg(root / "train" / c / f"{i:03d}.jpg", k)
            k += 1
        for i in range(val_per_class):
            jpeg(root / "val" / c / f"{i:03d}.jpg", 1000 + k + i)
    return root


def cfg(root: Path, loader: str, **kw) -> DataConfig:
    base = dict(source="imagefolder", root=str(root), labels_per_class=2, num_workers=1, eval_batch_size=4,
                loader=loader, mean=MEAN, std=STD)
    base.update(kw)
    return DataConfig(**base)


def data(d: DataConfig, augment=None, *, bs=2, ubs=4, img=24, need=("labelled", "unlabelled", "evaluation")):
    return build_data(d, augment or AugmentConfig(), img_size=img, batch_size=bs, unlabelled_batch_size=ubs, seed=0,
                      need=need)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_jpeg_folder(tmp_path_factory.mktemp("jpegs"))


@pytest.mark.parametrize("loader", LOADERS)
def test_views_shapes_and_the_shared_sampler_order(folder, loader):
    loader_param(loader)
    d = data(cfg(folder, loader), need=("labelled", "unlabelled", "evaluation", "pretrain"))
    x, y = next(iter(d.labelled.epoch(0)))
    assert x.shape == (2, 3, 24, 24) and x.dtype == torch.float32 and y.dtype == torch.int64
    w, s, y = next(iter(d.unlabelled.epoch(0)))
    assert w.shape == s.shape == (4, 3, 24, 24) and y.shape == (4,)
    assert ((w - s).flatten(1).abs().amax(1) > 1e-3).all()  # two independent views of each decoded image
    assert next(iter(d.pretrain.epoch(0)))[0].shape == (2, 3, 24, 24)
    ev = list(d.evaluation.epoch(0))
    assert [b[0].shape[0] for b in ev] == [4, 4, 1]  # keeps the last partial batch
    # the labels of every batch follow the one sampler: identical for both loaders
    ref = data(cfg(folder, "torch"), need=("labelled", "unlabelled", "evaluation", "pretrain"))
    for name in ("labelled", "unlabelled", "pretrain", "evaluation"):
        a, b = getattr(d, name), getattr(ref, name)
        assert np.array_equal(a.sample_ids, b.sample_ids) and len(a) == len(b)
        for epoch in (0, 1):
            got = [batch[-1] for batch in a.epoch(epoch, start=1)]
            want = [batch[-1] for batch in b.epoch(epoch, start=1)]
            assert all(torch.equal(p, q) for p, q in zip(got, want)) and len(got) == len(want) == len(a) - 1
    # an epoch abandoned after one batch (DALI has prefetched more) does not leak into the next one
    partial = d.unlabelled.epoch(3)
    next(partial)
    partial.close()
    got = [batch[-1] for batch in d.unlabelled.epoch(4)]
    want = [batch[-1] for batch in ref.unlabelled.epoch(4)]
    assert len(got) == len(want) and all(torch.equal(p, q) for p, q in zip(got, want))


def test_dali_evaluation_view_matches_torch(folder):
    """No randomness in evaluation: DALI's resize + centre crop against torchvision's, pixel by pixel."""
    require_dali()
    a = torch.cat([b[0] for b in data(cfg(folder, "dali")).evaluation.epoch(0)])
    b = torch.cat([b[0] for b in data(cfg(folder, "torch")).evaluation.epoch(0)])
    diff = (a - b).abs()
    # normalised units (1/255 of a channel = ~0.017): resampling and rounding differ, not the geometry
    assert diff.mean() < 0.05 and torch.quantile(diff.flatten(), 0.99) < 0.5, (diff.mean(), diff.max())


@pytest.mark.parametrize("view", ["labelled", "weak", "strong"])
def test_dali_views_match_torch_statistically(folder, view):
    """Per-view output statistics over many draws of the same images: mean, spread, erased share."""
    require_dali()
    aug = AugmentConfig(reprob=0.25)
    stats = {}
    for loader in LOADERS:
        d = data(cfg(folder, loader, labels_per_class=4), aug, bs=12, ubs=12)
        xs = []
        for epoch in range(16):
            for batch in (d.labelled if view == "labelled" else d.unlabelled).epoch(epoch):
                xs.append(batch[0] if view in ("labelled", "weak") else batch[1])
        x = torch.cat(xs)
        stats[loader] = (x.mean().item(), x.std().item(), (x.std(dim=(1, 2, 3))).mean().item())
    t, dl = stats["torch"], stats["dali"]
    assert dl[0] == pytest.approx(t[0], abs=0.2) and dl[1] == pytest.approx(t[1], rel=0.15), stats
    assert dl[2] == pytest.approx(t[2], rel=0.2), stats


@pytest.mark.parametrize("loader", LOADERS + ["digits"])
def test_labelled_set_smaller_than_one_batch_repeats_reshuffled(folder, loader):
    if loader == "digits":
        d = build_data(DataConfig(source="digits", labels_per_class=1, mean=[0.5], std=[0.5]),
                       AugmentConfig(hflip=0.0), img_size=16, batch_size=16, unlabelled_batch_size=32, seed=0,
                       need=("labelled",))
        n = 10
    else:
        loader_param(loader)
        d = data(cfg(folder, loader, labels_per_class=1), bs=8, need=("labelled",))
        n = 3
    s = d.labelled
    assert s.num_samples == n and len(s) == 1  # one full batch per epoch
    batches = [list(s.epoch(e)) for e in range(3)]
    for (x, y), in batches:
        assert x.shape[0] == (16 if loader == "digits" else 8)
        assert len(set(y.tolist())) == n  # every label appears (each pass covers the set)
        assert len({bytes(t.numpy().tobytes()) for t in x}) == len(x)  # a repeated image, a new augmentation
    orders = [s.sampler.shard(e) for e in range(3)]
    assert not all(np.array_equal(orders[0], o) for o in orders[1:])  # reshuffled


def test_auto_picks_the_loader_per_device(monkeypatch):
    from dataloading import dali

    folder_cfg = DataConfig(source="imagefolder", root="x", loader="auto")
    assert resolve_loader(folder_cfg, "cpu") == "torch"  # measured no faster on CPU: bench/RESULTS.md
    assert resolve_loader(DataConfig(source="digits", loader="dali", mean=[0.5], std=[0.5]), "cuda") == "torch"
    monkeypatch.setattr(dali, "available", lambda: True)
    assert resolve_loader(folder_cfg, "cuda") == "dali"
    monkeypatch.setattr(dali, "available", lambda: False)
    assert resolve_loader(folder_cfg, "cuda") == "torch"
    with pytest.raises(UserError, match="nvidia-dali-cuda130"):
        resolve_loader(DataConfig(source="imagefolder", root="x", loader="dali"), "cpu")


# ------------------------------------------------------------------------------------------ bad images
def plant_bad_files(root: Path) -> list[Path]:
    good = (root / "train" / "a" / "000.jpg").read_bytes()
    truncated, empty, text = root / "train" / "a" / "zz_trunc.jpg", root / "train" / "b" / "zz_empty.jpg", \
        root / "train" / "c" / "zz_text.jpg"
    truncated.write_bytes(good[: len(good) // 2])
    empty.write_bytes(b"")
    text.write_text("not an image, just text with a .jpg name\n")
    return [truncated, empty, text]


@pytest.mark.parametrize("loader", LOADERS)
def test_bad_images_torch_skips_dali_stops_and_both_honour_the_exclusion_list(tmp_path, loader):
    loader_param(loader)
    root = make_jpeg_folder(tmp_path / "data", per_class=4, val_per_class=1)
    bad = plant_bad_files(root)
    d = data(cfg(root, loader, num_workers=0), bs=5, need=("pretrain",))
    assert d.pretrain.num_samples == 15
    if loader == "torch":
        with pytest.warns(RuntimeWarning, match="unreadable image"):
            shapes = [b[0].shape for b in d.pretrain.epoch(0)]
        assert shapes == [(5, 3, 24, 24)] * 3  # skipped and replaced: batches stay full
        assert d.pretrain.corrupt_count == 3 and sorted(d.pretrain.corrupt_files) == sorted(map(str, bad))
    else:
        with pytest.raises(UserError, match=r"zz_(trunc|empty|text)\.jpg.*python -m dataloading\.validate"):
            for _ in d.pretrain.epoch(0):
                pass
    exclude = tmp_path / "exclude.txt"
    r = subprocess.run([sys.executable, "-m", "dataloading.validate", str(root), "--workers", "1", "--out",
                        str(exclude)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and all(str(p) in r.stdout for p in bad)
    clean = data(cfg(root, loader, num_workers=0, exclude=str(exclude)), bs=4, need=("pretrain",))
    assert clean.pretrain.num_samples == 12
    assert [b[0].shape for b in clean.pretrain.epoch(0)] == [(4, 3, 24, 24)] * 3
    assert clean.pretrain.corrupt_count == 0
    with pytest.raises(UserError, match="data.exclude"):
        data(cfg(root, loader, exclude=str(tmp_path / "missing.txt")), need=("pretrain",))


def test_make_index_from_names_and_per_class(folder, tmp_path):
    from dataloading.make_index import main

    names = tmp_path / "subset.txt"
    names.write_text("003.jpg\n")  # the same name in every class folder: one image per class
    assert main([str(folder), "--names", str(names), "--out", str(tmp_path / "a.csv")]) == 0
    d = data(cfg(folder, "torch", labelled_index=str(tmp_path / "a.csv")), need=("labelled",))
    assert list(d.labelled.sample_ids) == [3, 11, 19]  # 8 images per class, sorted class then name
    assert main([str(folder), "--per-class", "2", "--seed", "5", "--out", str(tmp_path / "b.csv")]) == 0
    generated = data(cfg(folder, "torch", labels_per_class=2, split_seed=5), need=("labelled",))
    from_file = data(cfg(folder, "torch", labelled_index=str(tmp_path / "b.csv")), need=("labelled",))
    assert np.array_equal(generated.labelled.sample_ids, from_file.labelled.sample_ids)
    names.write_text("nope.jpg\n")
    assert main([str(folder), "--names", str(names), "--out", str(tmp_path / "c.csv")]) == 2


# --------------------------------------------------------------------- the digits as a JPEG ImageFolder
@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    from dataloading.export_digits import export

    out = tmp_path_factory.mktemp("digits_folder")
    counts = export(out, size=16)
    assert counts["train"] + counts["val"] == 1797 and counts["index"][1] >= 10
    return out


def test_export_digits_layout_and_index_files(digits_folder):
    import csv

    classes = sorted(p.name for p in (digits_folder / "train").iterdir())
    assert classes == [str(c) for c in range(10)]
    with open(digits_folder / "train_10p_index.csv") as f:
        rows = list(csv.DictReader(f))
    d = data(cfg(digits_folder, "torch", labelled_index="train_10p_index.csv", mean=[0.5] * 3, std=[0.5] * 3),
             need=("labelled",))
    assert d.labelled.num_samples == len(rows) and list(d.labelled.sample_ids) == sorted(int(r["Index"]) for r in rows)
    from torchvision.datasets import ImageFolder
    targets = np.array(ImageFolder(str(digits_folder / "train")).targets)
    assert np.all(np.bincount(targets[d.labelled.sample_ids], minlength=10) >= 1)  # stratified


@pytest.mark.parametrize("loader", LOADERS)
def test_digits_folder_config_trains_every_stage(digits_folder, loader, tmp_path, capsys):
    loader_param(loader)
    from engine.train import main

    out = tmp_path / "run"
    rc = main(["--cfg", str(REPO / "configs" / "digits_folder.toml"), "--out", str(out), "--data.root",
               str(digits_folder), "--data.loader", loader, "--data.num_workers", "0", "--run.threads", "1",
               "--schedule.max_steps", "2", "--logging.tensorboard", "false", "--logging.progress", "false",
               "--stages.pretrain.data.batch_size", "32"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert f"via loader '{loader}'" in printed
    import json
    results = json.loads((out / "results.json").read_text())
    assert set(results["stages"]) == {"baseline", "pretrain", "finetune", "semi"}
    assert all(results["stages"][s]["steps"] == 2 for s in results["stages"])


def test_preflight_stops_before_training_for_a_later_stage(digits_folder, tmp_path, capsys):
    from engine.train import main

    out = tmp_path / "run"
    # the semi stage's unlabelled batch (mu x batch) is larger than the unlabelled set: found at start
    rc = main(["--cfg", str(REPO / "configs" / "digits_folder.toml"), "--out", str(out), "--data.root",
               str(digits_folder), "--data.loader", "torch", "--stages.semi.semi.mu", "200",
               "--schedule.max_steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "[semi]" in err and "unlabelled" in err and "semi.mu" in err
    assert not (out / "checkpoints").exists()  # nothing trained
    rc = main(["--cfg", str(REPO / "configs" / "digits_folder.toml"), "--out", str(out), "--data.root",
               str(digits_folder), "--stages.semi.model.num_classes", "7", "--schedule.max_steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.num_classes" in err and "10" in err and not (out / "checkpoints").exists()


def test_dali_gpu_benchmark_smoke(tmp_path, capsys):
    """The GPU benchmark's CPU form runs the engine's DALI streams end to end and reports no number."""
    require_dali()
    from bench.dali_gpu import main

    assert main(["--smoke", "--out", str(tmp_path / "r.json")]) == 0
    import json
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["smoke"] and not any(k.endswith("img_per_s") for k in result)
