"""The teacher's pseudo labels for the unlabelled pool, as a CSV a team can review or merge into its labels:

    python -m engine.pseudo_label --cfg RUN/config.toml --checkpoint RUN/model.safetensors [--out FILE.csv]

or the stage `pseudo_label` at the end of `run.stages` (it labels with the previous stage's teacher, or with
eval.checkpoint, and writes RUN/pseudo_labels.csv). Columns: index (position in load_digits() / in the
sorted train images, what the split CSVs index), path (image folders), label, class_name, confidence (the
teacher's max softmax probability), accepted (confidence >= tau, semi.threshold), true_label (the data's
own label: the digit, or the class folder the image sits in; -1 for an unreadable image).

The teacher sees the evaluation view of each image (deterministic), not the random weak view of training,
so the file is the same on every run.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dataloading.digits import unlabelled_pool
from dataloading.splits import choose_split
from engine.config import Config, load_plan
from engine.errors import EXIT_USAGE, UserError
from engine.inference import class_names, device_and_dtype, file_transform, load_classifier, probabilities

COLUMNS = ["index", "path", "label", "class_name", "confidence", "accepted", "true_label"]


class PoolImages(Dataset):
    """(image, ok) per position; an unreadable file gives zeros and ok = False (its row says so) instead of
    another image's label."""

    def __init__(self, folder, positions: np.ndarray, transform, mode: str, shape: tuple[int, ...]):
        self.folder, self.positions, self.transform, self.mode, self.shape = folder, positions, transform, mode, shape

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        try:
            with Image.open(self.folder.path(int(self.positions[i]))) as img:
                return self.transform(img.convert(self.mode)), True
        except Exception:  # noqa: BLE001 - PIL raises many types for broken files
            return torch.zeros(self.shape), False


def pool_batches(cfg: Config, batch_size: int) -> Iterator[tuple[np.ndarray, list[str], Tensor, Tensor]]:
    """(positions, paths, images (b, C, H, W), true labels (b,)) over the unlabelled split, in order."""
    d = cfg.data
    if d.source == "digits":
        ids, images, labels = unlabelled_pool(d, cfg.model.img_size)
        for s in range(0, len(ids), batch_size):
            chunk = slice(s, s + batch_size)
            yield ids[chunk], [""] * len(ids[chunk]), images[chunk], labels[chunk]
        return
    from dataloading.imagefolder import scan_both  # lazy: start-up cost (torchvision), which the digits never need

    train, _ = scan_both(d)
    split = choose_split(train.targets, len(train.classes), d, class_names=train.classes, root=d.root)
    positions = np.asarray(split.unlabelled, dtype=np.int64)
    transform, mode = file_transform(cfg)
    shape = (len(d.mean), cfg.model.img_size, cfg.model.img_size)
    loader = DataLoader(PoolImages(train, positions, transform, mode, shape), batch_size=batch_size,
                        num_workers=d.num_workers, shuffle=False)
    s = 0
    for images, ok in loader:
        pos = positions[s:s + len(ok)]
        s += len(ok)
        labels = torch.as_tensor(train.targets[pos]).masked_fill(~ok, -1)
        yield pos, [train.paths[p].decode() for p in pos], images, labels


@torch.no_grad()
def export_pseudo_labels(model: nn.Module, cfg: Config, threshold: float, out: Path, device: torch.device,
                         dtype: torch.dtype | None = None) -> dict:
    """Write the CSV; return {"pseudo_labels", "accepted", "accept_rate", "precision", "accuracy"} (rates in %)."""
    names = class_names(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    n = accepted = correct = accepted_correct = known = 0
    model.eval()
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for pos, paths, images, truth in pool_batches(cfg, cfg.data.eval_batch_size):
            conf, label = probabilities(model, images.to(device), dtype).max(dim=1)  # (b,) each
            conf, label = conf.cpu(), label.cpu()
            ok = truth >= 0
            take = (conf >= threshold) & ok
            hit = (label == truth) & ok
            n, known = n + len(pos), known + int(ok.sum())
            accepted, correct = accepted + int(take.sum()), correct + int(hit.sum())
            accepted_correct += int((take & hit).sum())
            for i, p, lab, c, a, t in zip(pos.tolist(), paths, label.tolist(), conf.tolist(), take.tolist(),
                                          truth.tolist()):
                w.writerow([i, p, lab, names[lab], f"{c:.6f}", int(a), t])
    tmp.replace(out)
    return {"pseudo_labels": n, "accepted": accepted, "accept_rate": 100.0 * accepted / max(n, 1),
            "precision": 100.0 * accepted_correct / max(accepted, 1), "accuracy": 100.0 * correct / max(known, 1),
            "threshold": threshold, "file": str(out)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.pseudo_label", description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", required=True, help="the run's config (RUN/config.toml): data, split, model")
    parser.add_argument("--checkpoint", required=True, help="RUN/model.safetensors or a .pt checkpoint")
    parser.add_argument("--out", help="CSV to write (default: pseudo_labels.csv next to --cfg)")
    parser.add_argument("--threshold", type=float, help="tau (default: the config's semi.threshold)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return EXIT_USAGE if exit_.code else 0
    try:
        plan = load_plan(args.cfg, [])
        cfg = plan.stages.get("semi", plan.base)
        tau = cfg.semi.threshold if args.threshold is None else args.threshold
        if not 0.0 < tau <= 1.0:
            raise UserError(f"--threshold must be in (0, 1], got {tau}")
        device, dtype = device_and_dtype(cfg)
        model, what = load_classifier(args.checkpoint, cfg, device)
        out = Path(args.out) if args.out else Path(args.cfg).parent / "pseudo_labels.csv"
        summary = export_pseudo_labels(model, cfg, tau, out, device, dtype)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(describe(summary, what))
    return 0


def describe(s: dict, what: str = "teacher") -> str:
    return (f"{s['pseudo_labels']} pseudo labels from the {what} -> {s['file']}: {s['accepted']} accepted at "
            f"tau {s['threshold']:g} ({s['accept_rate']:.1f} %), {s['precision']:.1f} % of them match the data's "
            f"own label (all: {s['accuracy']:.1f} %)")


if __name__ == "__main__":
    sys.exit(main())
