"""ModelConfig -> a ViT, and initialisation from a checkpoint with a printed key report."""

from __future__ import annotations

import copy
import difflib

import torch

from engine.checkpoint import safe_load
from engine.config import ModelConfig
from engine.errors import ConfigError, UserError
from engine.models.vit import ARCHS, VisionTransformer, build_vit, load_vit_state_dict


def arch_spec(m: ModelConfig) -> dict:
    """ARCHS[m.arch], after checking the architecture exists and the image tiles into its patches."""
    if m.arch not in ARCHS:
        near = difflib.get_close_matches(m.arch, list(ARCHS), n=1)
        hint = f"did you mean '{near[0]}'?" if near else f"valid: {', '.join(sorted(ARCHS))}"
        raise ConfigError("model.arch", f"unknown architecture '{m.arch}'; {hint}")
    spec = ARCHS[m.arch]
    if m.img_size % spec["patch_size"]:
        raise ConfigError("model.img_size", f"{m.img_size} is not a multiple of {m.arch}'s patch size "
                                            f"{spec['patch_size']}")
    return spec


def backend_checked(build):
    """Run a model constructor; an attention backend that cannot run here becomes a config error."""
    try:
        return build()
    except RuntimeError as err:  # e.g. xformers requested where it cannot run
        raise ConfigError("model.attn_backend", str(err)) from None


def build_model(m: ModelConfig) -> VisionTransformer:
    arch_spec(m)
    return backend_checked(lambda: build_vit(
        m.arch, img_size=m.img_size, in_chans=m.in_chans, num_classes=m.num_classes, global_pool=m.global_pool,
        pos_embed=m.pos_embed, drop_path=m.drop_path, attn_backend=m.attn_backend,
        grad_checkpointing=m.grad_checkpointing))


def load_weights(model: VisionTransformer, state: dict, source: str, verbose: bool = True) -> dict:
    """Load timm / MAE / engine weights; print what was loaded, ignored and newly initialised."""
    try:
        report = load_vit_state_dict(model, state)
    except ValueError as err:
        raise UserError(f"{source} does not fit the model built from model.arch / model.img_size / model.num_classes "
                        f"(set them to the checkpoint's): {err}") from None
    if verbose:
        print(f"init from {source}: {len(report['loaded'])} tensors loaded, "
              f"{len(report['ignored'])} ignored, {len(report['new'])} new")
        for kind in ("ignored", "new", "resampled"):
            if report.get(kind):
                print(f"  {kind}: {', '.join(report[kind])}")
    return report


def find_ema(state: dict) -> tuple[str, dict] | None:
    """The EMA weights a checkpoint carries, and under which key: this engine's final checkpoints keep them
    under `ema`, its rolling / best ones under `stage.ema`, the original Semi-ViT fine-tune under `model_ema`."""
    if not isinstance(state, dict):
        return None
    stage = state.get("stage") if isinstance(state.get("stage"), dict) else {}
    candidates = (("ema", state.get("ema")), ("model_ema", state.get("model_ema")), ("stage.ema", stage.get("ema")))
    for key, value in candidates:
        if isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values()):
            return key, value
    return None


def init_from_checkpoint(model: VisionTransformer, path: str, verbose: bool = True) -> dict | None:
    """model.init: returns the checkpoint's EMA weights, as a full state dict of `model`, when it has them
    (they seed the semi teacher); None otherwise."""
    state = safe_load(path)
    weights = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(weights, dict) or not any(isinstance(v, torch.Tensor) for v in weights.values()):
        raise UserError(f"{path}: no state dict found: expected {{'model': state_dict}} or a bare state dict of "
                        f"tensors; point the setting (model.init) at such a file")
    load_weights(model, weights, path, verbose=verbose)
    found = find_ema(state)
    if found is None:
        return None
    key, ema = found
    # Through the same loader as the weights: prefixes, position-embedding resampling, shape checks.
    teacher = copy.deepcopy(model)
    load_weights(teacher, ema, f"{path} [{key}]", verbose=verbose)
    return teacher.state_dict()
