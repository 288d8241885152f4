"""Data: digits splits and streams, batched augmentation, image folders, index files, corrupt files, sampler."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataloading import BatchStream, StageData, build_data, describe_data
from dataloading import digits as digits_source
from dataloading.randaug import parse_randaug
from dataloading.sampler import ShardedSampler
from dataloading.tensor_augment import strong, weak
from engine.config.sections import AugmentConfig, DataConfig
from engine.errors import UserError

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------- digits
def digits_cfg(**kw) -> DataConfig:
    base = dict(source="digits", labels_per_class=10, split_seed=0, mean=[0.5], std=[0.5], eval_batch_size=64)
    base.update(kw)
    return DataConfig(**base)


def digits_data(data=None, augment=None, *, seed=0, rank=0, world_size=1, bs=20, ubs=40,
                need=("labelled", "unlabelled", "evaluation")) -> StageData:
    return build_data(data or digits_cfg(), augment or AugmentConfig(hflip=0.0), img_size=16, batch_size=bs,
                      unlabelled_batch_size=ubs, seed=seed, rank=rank, world_size=world_size, need=need)


def test_digits_split_sizes_and_independence():
    _, targets = digits_source._load()
    s = digits_source.split_indices(digits_cfg())
    assert len(np.intersect1d(s.train, s.test)) == 0
    assert len(s.train) + len(s.test) == len(targets) == 1797
    assert abs(len(s.test) - 0.3 * 1797) <= 1
    assert np.array_equal(np.bincount(targets[s.labelled], minlength=10), np.full(10, 10))  # exactly 10 per class
    assert len(np.intersect1d(s.labelled, s.unlabelled)) == 0
    assert np.array_equal(np.union1d(s.labelled, s.unlabelled), s.train)
    # the test split never moves; the labelled split follows split_seed only
    other = digits_source.split_indices(digits_cfg(split_seed=1))
    assert np.array_equal(other.test, s.test) and np.array_equal(other.train, s.train)
    assert not np.array_equal(other.labelled, s.labelled)
    frac = digits_source.split_indices(digits_cfg(labels_per_class=0, label_fraction=0.01))
    assert np.all(np.bincount(targets[frac.labelled], minlength=10) >= 1)  # at least one per class
    a, b = digits_data(seed=0), digits_data(seed=7)
    assert np.array_equal(a.labelled.sample_ids, b.labelled.sample_ids)  # run seed does not move the split
    assert np.array_equal(a.labelled.sample_ids, s.labelled)
    counts = (a.labelled.num_samples, a.unlabelled.num_samples, a.evaluation.num_samples)
    assert counts == (100, len(s.unlabelled), len(s.test))
    assert describe_data(digits_cfg()) == {"num_classes": 10, "labelled": 100, "unlabelled": len(s.unlabelled),
                                           "evaluation": len(s.test), "pretrain": len(s.train)}
    assert (a.num_classes, a.in_chans, a.pretrain) == (10, 1, None)
    assert isinstance(a.labelled, BatchStream)


def test_digits_eval_covers_every_test_sample_once_across_ranks():
    single = digits_data()
    ref = torch.cat([x for x, _ in single.evaluation.epoch(0)])
    parts, labels = [], []
    for rank in range(2):
        ev = digits_data(rank=rank, world_size=2).evaluation
        batches = list(ev.epoch(0))
        assert len(batches) == len(ev)
        parts += [x for x, _ in batches]
        labels += [y for _, y in batches]
    got = torch.cat(parts)
    assert got.shape == ref.shape == (single.evaluation.num_samples, 1, 16, 16)
    rows = lambda t: sorted(map(bytes, t.flatten(1).numpy().view(np.uint8)))  # noqa: E731  multiset of images
    assert rows(got) == rows(ref)
    assert torch.equal(torch.cat(labels).bincount(), torch.cat([y for _, y in single.evaluation.epoch(0)]).bincount())
    assert torch.equal(ref, torch.cat([x for x, _ in single.evaluation.epoch(3)]))  # eval order is fixed


def test_digits_train_order_changes_every_epoch_on_one_process():
    d = digits_data()
    orders = [torch.cat([y for _, _, y in d.unlabelled.epoch(e)]) for e in range(3)]
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    again = torch.cat([y for _, _, y in digits_data().unlabelled.epoch(1)])
    assert torch.equal(orders[1], again)  # but deterministic
    assert len(d.labelled) == 100 // 20 and len(d.unlabelled) == d.unlabelled.num_samples // 40  # drop_last


def test_digits_start_reproduces_the_tail_exactly():
    d = digits_data()  # default randaug: the labelled view is the strong policy
    for stream in (d.labelled, d.unlabelled):
        full = list(stream.epoch(2))
        tail = list(stream.epoch(2, start=3))
        assert len(tail) == len(full) - 3
        for a, b in zip(full[3:], tail):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert list(d.labelled.epoch(0, start=len(d.labelled))) == []


def test_digits_weak_and_strong_views():
    d = digits_data(augment=AugmentConfig(hflip=0.0, reprob=0.25))
    s = d.unlabelled
    w, st, y = next(iter(s.epoch(0)))
    clean = s.images[torch.as_tensor(s.sampler.shard(0)[:40])]
    assert w.shape == st.shape == clean.shape == (40, 1, 16, 16) and w.dtype == st.dtype == torch.float32
    assert y.dtype == torch.int64 and torch.equal(y, s.labels[torch.as_tensor(s.sampler.shard(0)[:40])])
    assert not torch.equal(w, clean) and not torch.equal(st, clean)
    per_sample = (w - st).flatten(1).abs().amax(1)
    assert (per_sample > 1e-3).all()  # two independent views of every image
    bg = (0 - 0.5) / 0.5
    assert w.min() >= bg - 1e-5 and w.max() <= 1.0 + 1e-5  # weak only moves pixels, pads with background
    assert (w == bg).float().mean() > 0.3  # background stays background (not zero-padded to grey)


GEOMETRIC = ("rotate", "shear_x", "shear_y", "zoom")


@pytest.mark.parametrize("view", ["weak", "strong"])
def test_hflip_probability_is_respected(view):
    # a bright bar left of centre on background: its centroid stays left unless the view flips it
    bar = torch.full((64, 1, 16, 16), -1.0)  # mean 0.5, std 0.5: background pixel 0 -> -1
    bar[..., 2:5] = 1.0
    cols = torch.arange(16.0) + 0.5
    for hflip, side in ((0.0, -1.0), (1.0, 1.0)):
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            if view == "weak":
                out = weak(bar, g, mean=[0.5], std=[0.5], hflip=hflip)
            else:
                out = strong(bar, g, 9.0, mean=[0.5], std=[0.5], hflip=hflip, mstd=0.5, prob=1.0, ops=GEOMETRIC)
            mass = (out + 1.0).sum((1, 2))  # (B, W)
            centroid = (mass * cols).sum(1) / mass.sum(1)
            assert ((centroid - 8.0) * side > 0).all(), f"hflip={hflip}: some samples flipped the wrong way"
    # hflip=1 flips the output of hflip=0 and changes nothing else (same seed, noise and erasing off)
    x = torch.randn(16, 1, 16, 16)
    kw = dict(mean=[0.5], std=[0.5], mstd=0.5, prob=1.0, ops=GEOMETRIC + ("brightness", "contrast", "sharpness"))
    f = weak if view == "weak" else strong
    kw = dict(mean=[0.5], std=[0.5]) if view == "weak" else kw
    out0 = f(x, torch.Generator().manual_seed(2), hflip=0.0, **kw)
    out1 = f(x, torch.Generator().manual_seed(2), hflip=1.0, **kw)
    torch.testing.assert_close(out1, out0.flip(-1), atol=1e-5, rtol=1e-5)


def test_strong_policy_is_seeded_and_batched():
    x = torch.randn(8, 1, 16, 16)
    a = strong(x, torch.Generator().manual_seed(3), 9.0, reprob=1.0, mstd=0.5)
    b = strong(x, torch.Generator().manual_seed(3), 9.0, reprob=1.0, mstd=0.5)
    c = strong(x, torch.Generator().manual_seed(4), 9.0, reprob=1.0, mstd=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ((a == 0).flatten(1).sum(1) >= 1).all()  # reprob=1: every sample has an erased box (fill 0)
    # each sample draws its own parameters: identical inputs give different outputs
    same = strong(x[:1].expand(8, -1, -1, -1).contiguous(), torch.Generator().manual_seed(5), 9.0)
    assert len({bytes(t.numpy().tobytes()) for t in same}) == 8


def test_digits_config_errors():
    with pytest.raises(UserError, match="data.mean"):
        digits_data(digits_cfg(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]))
    with pytest.raises(UserError, match="fewer than one batch"):
        digits_data(ubs=2000)  # the unlabelled set defines the epoch: it must fill a batch
    assert len(digits_data(bs=200).labelled) == 1  # a labelled set smaller than a batch repeats instead
    with pytest.raises(UserError, match="augment.randaug"):
        digits_data(augment=AugmentConfig(randaug="rand-q9"))
    with pytest.raises(UserError, match="fewer than"):
        digits_source.split_indices(digits_cfg(labels_per_class=1000))


def test_parse_randaug():
    s = parse_randaug("rand-m9-mstd0.5-inc1")
    assert (s.magnitude, s.num_ops, s.mstd, s.prob, s.increasing) == (9.0, 2, 0.5, 0.5, True)
    assert parse_randaug("rand-m7-n3").num_ops == 3 and parse_randaug("") is None


def test_pretrain_stream_digits():
    d = digits_data(need=("pretrain",))
    assert d.labelled is None and d.unlabelled is None and d.evaluation is not None
    x, y = next(iter(d.pretrain.epoch(0)))
    assert x.shape == (20, 1, 16, 16) and d.pretrain.num_samples == describe_data(digits_cfg())["pretrain"]


# ----------------------------------------------------------------------------------------- image folders
CLASSES = ("zebra", "apple", "mango")  # sorted: apple, mango, zebra
NAMES = ("b.png", "a.jpg", "f.jpeg", "c.png", "e.JPEG", "d.png")  # sorted: a b c d e f
PER_CLASS = len(NAMES)


def grey(p: int) -> int:
    return 10 + 12 * p  # pixel value that encodes the sorted position p


def make_folder(root: Path, val_per_class: int = 2) -> Path:
    order = sorted(CLASSES)
    for cls in CLASSES:  # created in unsorted order on purpose
        for split, names in (("train", NAMES), ("val", NAMES[:val_per_class])):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for name in names:
                p = order.index(cls) * PER_CLASS + sorted(n.lower() for n in NAMES).index(name.lower())
                Image.new("RGB", (20, 20), (grey(p),) * 3).save(root / split / cls / name, quality=95)
    return root


def folder_cfg(root: Path, **kw) -> DataConfig:
    base = dict(source="imagefolder", root=str(root), labels_per_class=2, num_workers=0, eval_batch_size=4,
                mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    base.update(kw)
    return DataConfig(**base)


def folder_data(data: DataConfig, augment=None, *, bs=2, ubs=4, rank=0, world_size=1,
                need=("labelled", "unlabelled", "evaluation", "pretrain")) -> StageData:
    return build_data(data, augment or AugmentConfig(), img_size=16, batch_size=bs, unlabelled_batch_size=ubs,
                      seed=0, rank=rank, world_size=world_size, need=need)


def write_index(path: Path, values) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Index", "Name"])
        for v in values:
            w.writerow([v, f"x{v}"])
    return path


def positions_seen(stream) -> list[int]:
    """Decode the sorted position from the constant grey of each (crop-invariant) image."""
    out = []
    for batch in stream.epoch(0):
        x, y = batch[0], batch[-1]
        for img, label in zip(x, y):
            p = int(round((img.mean().item() * 255 - 10) / 12))
            assert label.item() == p // PER_CLASS  # label of the class folder in sorted order
            out.append(p)
    return out


def test_index_csv_selects_class_then_filename_positions(tmp_path):
    root = make_folder(tmp_path / "data")
    idx = write_index(tmp_path / "one_percent.csv", [13, 0, 17, 7])
    plain = AugmentConfig(randaug="", reprob=0.0, color_jitter=0.0)  # crops of a constant image stay constant
    d = folder_data(folder_cfg(root, labelled_index=str(idx)), plain, bs=2)
    assert d.num_classes == 3 and d.in_chans == 3 and d.classes == sorted(CLASSES)
    assert d.labelled.num_samples == 4 and d.unlabelled.num_samples == 3 * PER_CLASS - 4
    assert list(d.labelled.sample_ids) == [0, 7, 13, 17]
    assert sorted(positions_seen(d.labelled)) == [0, 7, 13, 17]
    assert set(d.unlabelled.sample_ids) == set(range(18)) - {0, 7, 13, 17}
    assert describe_data(folder_cfg(root, labelled_index=str(idx)))["labelled"] == 4
    assert sorted(positions_seen(d.evaluation)) == sorted(
        c * PER_CLASS + k for c in range(3) for k in range(2))  # val: 2 per class, positions encode train order


def test_index_csv_errors(tmp_path):
    root = make_folder(tmp_path / "data")
    bad = write_index(tmp_path / "bad.csv", [3, 18])
    with pytest.raises(UserError, match=r"bad\.csv.*line 3.*18.*0\.\.17"):
        folder_data(folder_cfg(root, labelled_index=str(bad)))
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("Position\n1\n")
    with pytest.raises(UserError, match=r"nocol\.csv.*no column 'Index'"):
        describe_data(folder_cfg(root, unlabelled_index=str(nocol)))
    with pytest.raises(UserError, match="missing.csv"):
        describe_data(folder_cfg(root, labelled_index=str(tmp_path / "missing.csv")))


def test_folder_layout_errors(tmp_path):
    root = make_folder(tmp_path / "data")
    with pytest.raises(UserError, match="does not exist"):
        describe_data(folder_cfg(tmp_path / "nowhere"))
    (root / "val" / "mango").rename(root / "val" / "melon")
    with pytest.raises(UserError, match="missing in val: mango; not in train: melon"):
        folder_data(folder_cfg(root))
    import shutil
    shutil.rmtree(root / "val")
    with pytest.raises(UserError, match=r"val folder .*val does not exist"):
        folder_data(folder_cfg(root))


def test_folder_batch_shapes_and_exact_resume(tmp_path):
    root = make_folder(tmp_path / "data")
    d = folder_data(folder_cfg(root, labels_per_class=4), AugmentConfig(reprob=0.5))
    x, y = next(iter(d.labelled.epoch(0)))
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    w, s, y = next(iter(d.unlabelled.epoch(0)))
    assert w.shape == s.shape == (4, 3, 16, 16) and not torch.equal(w, s) and y.shape == (4,)
    x, y = next(iter(d.pretrain.epoch(0)))
    assert x.shape == (2, 3, 16, 16)
    ev = list(d.evaluation.epoch(0))
    assert [b[0].shape[0] for b in ev] == [4, 2] and ev[0][0].shape[1:] == (3, 16, 16)  # keeps the last batch
    assert len(d.labelled) == 12 // 2 and len(d.unlabelled) == 6 // 4  # train streams drop the partial batch
    full, tail = list(d.labelled.epoch(1)), list(d.labelled.epoch(1, start=2))
    assert len(tail) == len(full) - 2
    assert all(torch.equal(a, b) for fa, fb in zip(full[2:], tail) for a, b in zip(fa, fb))
    assert not torch.equal(torch.cat([b[1] for b in full]), torch.cat([b[1] for b in d.labelled.epoch(2)])) or \
        not torch.equal(full[0][0], next(iter(d.labelled.epoch(2)))[0])  # epochs differ
    # augmentations are seeded per sample: worker processes change nothing
    dw = folder_data(folder_cfg(root, labels_per_class=4, num_workers=2), AugmentConfig(reprob=0.5))
    with_workers = list(dw.labelled.epoch(1))
    assert len(with_workers) == len(full)
    assert all(torch.equal(a, b) for fa, fb in zip(full, with_workers) for a, b in zip(fa, fb))


def test_corrupt_image_is_skipped_counted_and_validated(tmp_path):
    root = make_folder(tmp_path / "data")
    broken = root / "train" / "apple" / "c.png"
    broken.write_bytes(b"this is not a png")
    d = folder_data(folder_cfg(root), need=("pretrain",), bs=6)
    with pytest.warns(RuntimeWarning, match="c.png"):
        shapes = [b[0].shape for b in d.pretrain.epoch(0)]
    assert shapes == [(6, 3, 16, 16)] * 3  # every batch full: the broken sample was replaced
    assert d.pretrain.corrupt_count == 1 and d.pretrain.corrupt_files == [str(broken)]
    # with worker processes the count is shared back to the main process
    dw = folder_data(folder_cfg(root, num_workers=2), need=("pretrain",), bs=6)
    assert [b[0].shape for b in dw.pretrain.epoch(0)] == [(6, 3, 16, 16)] * 3
    assert dw.pretrain.corrupt_count == 1

    run = lambda *a: subprocess.run([sys.executable, "-m", "dataloading.validate", *a], cwd=REPO,  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    r = run(str(root), "--workers", "1")
    assert r.returncode == 1 and str(broken) in r.stdout and "1 unreadable of 24" in r.stderr
    broken.unlink()
    assert run(str(root)).returncode == 0
    assert run(str(tmp_path / "nowhere")).returncode == 2
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from dataloading.validate import IMG_EXTENSIONS as checked
    assert checked == IMG_EXTENSIONS  # the validator checks exactly the files the loader reads


def test_sampler_shards_are_disjoint_and_cover():
    n, bs, world = 103, 8, 3
    train = [ShardedSampler(n, bs, seed=5, stream=1, rank=r, world_size=world) for r in range(world)]
    shards = [s.shard(4) for s in train]
    assert all(len(s) == len(train[0]) * bs for s in shards) and len(train[0]) == (n // world) // bs
    flat = np.concatenate(shards)
    assert len(np.unique(flat)) == len(flat) and flat.max() < n  # disjoint
    assert not np.array_equal(train[0].shard(4), train[0].shard(5))  # new order every epoch
    full = ShardedSampler(n, bs, seed=5, stream=1, rank=0, world_size=1, drop_last=False)
    assert np.array_equal(np.sort(full.shard(0)), np.arange(n))
    ev = [ShardedSampler(n, bs, seed=5, stream=3, rank=r, world_size=world, shuffle=False) for r in range(world)]
    flat = np.concatenate([s.shard(0) for s in ev])
    assert np.array_equal(np.sort(flat), np.arange(n))  # eval: every sample exactly once, nothing padded
    assert sum(sum(len(b) for b in s.batches(0)) for s in ev) == n
    assert [len(list(s.batches(0, start=2))) for s in ev] == [len(s) - 2 for s in ev]


def test_sampler_repeats_a_set_smaller_than_a_batch():
    from dataloading.sampler import EpochBatchSampler

    for world in (1, 2, 4):  # 3 samples: fewer than one batch of 4 per rank, even fewer than the ranks
        shards = [ShardedSampler(3, 4, seed=1, stream=1, rank=r, world_size=world, repeat=True) for r in range(world)]
        assert all(len(s) == 1 and len(s.shard(0)) == 4 for s in shards)  # one full batch per rank and epoch
        flat = np.concatenate([s.shard(0) for s in shards])
        assert set(flat) == {0, 1, 2} and np.bincount(flat).max() - np.bincount(flat).min() <= 1  # balanced
    s = ShardedSampler(3, 8, seed=1, stream=1, repeat=True)
    assert not all(np.array_equal(s.shard(0)[:3], s.shard(e)[:3]) for e in range(1, 4))  # reshuffled
    keys = next(iter(EpochBatchSampler(s)))
    assert len({seed for _, seed in keys}) == 8  # a repeated position draws a new augmentation seed
    assert len(ShardedSampler(3, 8, seed=1, stream=1, repeat=False)) == 0  # without repeat: no batch


def test_folder_views_follow_timm_jitter_rule_and_eval_crop():
    """timm's create_transform (the original's) jitters colour only without RandAugment: the weak view
    jitters, the strong view does not. Evaluation crops 0.875 up to 224 px, nothing above."""
    from torchvision.transforms import v2

    from dataloading import transforms as T

    aug, policy = AugmentConfig(), parse_randaug("rand-m9-mstd0.5-inc1")
    kinds = lambda t: [type(x) for x in t.transforms]  # noqa: E731
    assert v2.ColorJitter in kinds(T.weak(32, aug, [0.5] * 3, [0.5] * 3))
    assert v2.ColorJitter not in kinds(T.strong(32, aug, policy, [0.5] * 3, [0.5] * 3))
    assert v2.ColorJitter in kinds(T.strong(32, aug, None, [0.5] * 3, [0.5] * 3))
    assert T.evaluation(224, [0.5], [0.5]).transforms[0].size == [256]
    assert T.evaluation(384, [0.5], [0.5]).transforms[0].size == [384]
