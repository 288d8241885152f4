"""Using a trained model: load a classifier from any checkpoint the engine writes, the evaluation view of
an image file, and the class names. Shared by engine.predict and the pseudo_label stage."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from dataloading.digits import preprocess
from engine.checkpoint import load_safetensors, safe_load
from engine.config import Config
from engine.errors import UserError
from engine.models.build import build_model, find_ema
from engine.models.vit import load_vit_state_dict

HARMLESS = ("mask_token", "decoder_")  # MAE-only keys a classifier never uses


def read_weights(path: str | Path) -> tuple[dict, str]:
    """The weights to classify with and what they are: the teacher (EMA) when the file has one, else the model.
    Reads model.safetensors (the exported teacher), this engine's .pt checkpoints and {'model': ...} files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--checkpoint '{path}' not found: give RUN/model.safetensors or "
                        f"RUN/checkpoints/<stage>-final.pt")
    if path.suffix == ".safetensors":
        return load_safetensors(path), "exported teacher"
    state = safe_load(path)
    found = find_ema(state)
    if found is not None:
        return found[1], f"teacher ({found[0]})"
    weights = state.get("model", state) if isinstance(state, dict) else None
    if not isinstance(weights, dict) or not any(isinstance(v, Tensor) for v in weights.values()):
        raise UserError(f"--checkpoint '{path}' holds no weights: expected this engine's checkpoint, "
                        f"model.safetensors or a {{'model': state_dict}} file")
    return weights, "model"


def device_and_dtype(cfg: Config) -> tuple[torch.device, torch.dtype | None]:
    """run.device / run.precision as training reads them: CUDA and bf16 autocast when present, else CPU fp32."""
    cuda = torch.cuda.is_available() and cfg.run.device != "cpu"
    if cfg.run.device == "cuda" and not cuda:
        raise UserError("run.device = 'cuda' but no CUDA device is visible: use --run.device cpu (or auto)")
    bf16 = cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and cuda)
    return torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if bf16 else None


def load_classifier(path: str | Path, cfg: Config, device: torch.device) -> tuple[nn.Module, str]:
    """A ViT built from cfg.model with every weight from the checkpoint, in eval mode on `device`. A checkpoint
    of another architecture or class count is a UserError naming the keys (nothing is silently left fresh)."""
    weights, what = read_weights(path)
    model = build_model(cfg.model)
    try:
        report = load_vit_state_dict(model, weights, strict_head=True)
    except ValueError as err:
        raise UserError(f"--checkpoint '{path}' does not fit model.arch '{cfg.model.arch}' with model.num_classes "
                        f"{cfg.model.num_classes} (pass the run's own --cfg RUN/config.toml): "
                        f"{' '.join(str(err).split())}") from None
    missing = [k for k in report["new"]]
    extra = [k for k in report["ignored"] if not k.startswith(HARMLESS)]
    if missing or extra:
        show = lambda ks: ", ".join(ks[:6]) + (f", ... ({len(ks)} in all)" if len(ks) > 6 else "")  # noqa: E731
        parts = ([f"lacks {show(missing)}"] if missing else []) + ([f"has extra {show(extra)}"] if extra else [])
        raise UserError(f"--checkpoint '{path}' is not a '{cfg.model.arch}' classifier: it {'; it '.join(parts)} "
                        f"(a pre-training checkpoint has no head; pass the run's own --cfg RUN/config.toml)")
    return model.to(device).eval(), what


def class_names(cfg: Config) -> list[str]:
    """Names of the model's classes: the digits, the train folder's class folders when they are there,
    else the class indices."""
    n = cfg.model.num_classes
    if cfg.data.source == "digits":
        return [str(c) for c in range(n)]
    train = Path(cfg.data.root).expanduser() / cfg.data.train_dir
    if cfg.data.root and train.is_dir():
        names = sorted(e.name for e in train.iterdir() if e.is_dir())
        if len(names) == n:
            return names
    return [str(c) for c in range(n)]


def file_transform(cfg: Config) -> tuple[Callable, str]:
    """(PIL image -> (C, H, W) tensor, PIL mode): the evaluation view the model was scored with."""
    d, size = cfg.data, cfg.model.img_size
    mode = "RGB" if len(d.mean) == 3 else "L"
    if d.source == "digits":
        from torchvision.transforms.v2.functional import pil_to_tensor

        def digits_view(img):  # the whole image, resized as the in-memory digits are (no crop)
            x = pil_to_tensor(img).float().div(255.0)  # (1, h, w) in [0, 1]
            return preprocess(x[None], size, d.mean, d.std)[0]

        return digits_view, mode
    from dataloading import transforms as T  # lazy: start-up cost (torchvision), which the digits never need

    return T.evaluation(size, d.mean, d.std), mode


@torch.no_grad()
def probabilities(model: nn.Module, images: Tensor, dtype: torch.dtype | None) -> Tensor:
    """Softmax over classes (float32), under bf16 autocast when `dtype` is set."""
    if dtype is None:
        return model(images).float().softmax(-1)
    with torch.autocast(images.device.type, dtype=dtype):
        return model(images).float().softmax(-1)
