"""Position embeddings: MAE's fixed 2-D sin-cos table and resampling of learned tables to a new grid."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _1d_sincos(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """MAE's 1-D table: [sin(pos * omega), cos(pos * omega)] with omega = 1 / 10000**(i / (dim/2)).

    pos: (M,) float64 -> (M, dim) float64.
    """
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = pos[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, dim)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embedding, as a float32 tensor of shape (N, D), or (1+N, D) with a
    leading zero row for the class token when ``cls_token``.

    Half the dims encode one grid axis and half the other, exactly as MAE's numpy code (which builds
    ``np.meshgrid(grid_w, grid_h)`` so the first half follows the column index and the second the row
    index), so a table made here loads into / compares with MAE checkpoints bit for bit in float32.
    ``grid_size`` is an int (square) or (h, w). Computed in float64 like MAE's numpy, then cast.
    Factory calls take the ambient default device, so this also works under ``with torch.device("meta")``.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    rows = torch.arange(gh, dtype=torch.float64)
    cols = torch.arange(gw, dtype=torch.float64)
    # grid[0][i, j] = cols[j], grid[1][i, j] = rows[i]: same as np.meshgrid(grid_w, grid_h)
    grid = torch.meshgrid(cols, rows, indexing="xy")
    emb_a = _1d_sincos(embed_dim // 2, grid[0].reshape(-1))  # (N, D/2)
    emb_b = _1d_sincos(embed_dim // 2, grid[1].reshape(-1))  # (N, D/2)
    emb = torch.cat([emb_a, emb_b], dim=1)  # (N, D)
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, embed_dim), emb], dim=0)  # (1+N, D)
    return emb.float()


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    old_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Bicubically resample the patch part of ``pos_embed`` (1, P+N, D) to ``new_grid`` (h, w), keeping the
    P prefix tokens as they are. Same as timm's ``resample_abs_pos_embed`` with antialias False and
    align_corners False. ``old_grid=None`` assumes the old grid is square.
    """
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    num_old = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(num_old)
        if side * side != num_old:
            raise ValueError(
                f"pos_embed has {num_old} patch positions, not a square grid: pass old_grid=(h, w) explicitly"
            )
        old_grid = (side, side)
    old_grid = (int(old_grid[0]), int(old_grid[1]))
    if old_grid[0] * old_grid[1] != num_old:
        raise ValueError(f"old_grid {old_grid} does not match the {num_old} patch positions of pos_embed")
    if old_grid == new_grid:
        return pos_embed

    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    # interpolate in float32 (bicubic is not implemented for every low-precision dtype / device)
    grid = patches.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # (1, D, h, w)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False, antialias=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)  # (1, P+N', D)
