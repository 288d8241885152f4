"""A picture of what MAE learned: masked input, reconstruction, original (one column per image)."""

from __future__ import annotations

from pathlib import Path

import torch


def _display(x: torch.Tensor, mean, std, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(n, C, H, W) model-space images -> [0, 1] display space (undo data.mean/std, else min-max per image)."""
    if mean is not None and std is not None:
        m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
        return (x * s + m).clamp(0, 1)
    return ((x - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)


@torch.no_grad()
def reconstruction_rows(mae, images: torch.Tensor, n: int = 8, generator: torch.Generator | None = None,
                        mean=None, std=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masked input with grey patches, reconstruction, original), each (n, C, H, W) in [0, 1] on the CPU.
    The reconstruction keeps the visible patches of the input and takes the masked ones from the prediction,
    mapped back to pixels with each patch's own mean / std when the model regresses normalised pixels."""
    was_training = mae.training
    mae.eval()
    imgs = images[:n].float()
    _, pred, mask = mae(imgs, generator=generator)  # (n, N, p*p*C), (n, N)
    mae.train(was_training)
    pred = pred.float()
    if mae.norm_pix_loss:
        target = mae.patchify(imgs)
        pred = pred * (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    m = mae.unpatchify(mask.float().unsqueeze(-1).expand(-1, -1, pred.shape[-1]))  # (n, C, H, W), 1 = masked
    recon = imgs * (1 - m) + mae.unpatchify(pred) * m
    lo = imgs.amin(dim=(1, 2, 3), keepdim=True)
    hi = imgs.amax(dim=(1, 2, 3), keepdim=True)
    original = _display(imgs, mean, std, lo, hi)
    masked = original * (1 - m) + 0.5 * m
    recon = _display(recon, mean, std, lo, hi)
    return masked.cpu(), recon.cpu(), original.cpu()


def reconstruction_grid(mae, images: torch.Tensor, path: Path, n: int = 8,
                        generator: torch.Generator | None = None, mean=None, std=None) -> Path:
    """Save a PNG of three rows (masked input, reconstruction, original) for the first n images.
    ``mean`` / ``std``: the data normalisation to undo for display (else each image is min-max scaled)."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state: safe in any process or thread

    rows = reconstruction_rows(mae, images, n, generator, mean, std)
    n = rows[0].shape[0]
    fig = Figure(figsize=(1.3 * n, 4.0))
    axes = fig.subplots(3, n, squeeze=False)
    for r, (title, batch) in enumerate(zip(("masked", "reconstruction", "original"), rows)):
        for i in range(n):
            ax = axes[r][i]
            img = batch[i].permute(1, 2, 0).numpy()  # (H, W, C)
            if img.shape[-1] == 1:
                ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
