"""Vision Transformer (MAE / timm layout), with a choice of attention backend.

State-dict keys follow timm's ``VisionTransformer`` exactly, so timm and MAE checkpoints load unchanged:
``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``,
then ``norm.*`` + ``head.*`` (class-token pooling) or ``fc_norm.*`` + ``head.*`` (average pooling).
"""

from __future__ import annotations

import difflib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .pos_embed import get_2d_sincos_pos_embed, resample_pos_embed

ATTN_BACKENDS = ("sdpa", "math", "xformers")

_SIZES = {  # name -> (embed_dim, depth, num_heads)
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
ARCHS: dict[str, dict] = {
    f"vit_{size}_patch{p}": dict(patch_size=p, embed_dim=d, depth=n, num_heads=h, mlp_ratio=4.0)
    for size, (d, n, h) in _SIZES.items()
    for p in (14, 16)
}
# demo sizes for 16x16 single-channel digits: build with img_size=16, in_chans=1
ARCHS["vit_digits_tiny"] = dict(patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0)
ARCHS["vit_digits_small"] = dict(patch_size=4, embed_dim=96, depth=6, num_heads=4, mlp_ratio=4.0)


def _xformers_ops():
    try:
        import xformers.ops as xops
    except Exception as e:  # ImportError, or a broken build raising something else
        raise RuntimeError(
            "attn_backend 'xformers' needs the xformers package and a CUDA device: pip install xformers, "
            "or use attn_backend = 'sdpa'"
        ) from e
    return xops


def _check_backend(backend: str) -> str:
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"unknown attn_backend {backend!r}: valid ones are {', '.join(map(repr, ATTN_BACKENDS))}")
    if backend == "xformers":
        _xformers_ops()  # fail now, with the clear message, rather than at the first forward
    return backend


class PatchEmbed(nn.Module):
    def __init__(self, img_size: tuple[int, int], patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size = img_size
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input is {tuple(x.shape[-2:])} px but the model was built for {self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, backend: str):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)  # (B, N, 3, H, Dh)
        if self.backend == "xformers":
            if x.device.type != "cuda":
                raise RuntimeError(
                    f"attn_backend 'xformers' runs on CUDA tensors only, got a {x.device.type} tensor: "
                    "use attn_backend = 'sdpa' off the GPU"
                )
            q, k, v = qkv.unbind(2)  # (B, N, H, Dh): xformers' layout
            x = _xformers_ops().memory_efficient_attention(q, k, v)  # (B, N, H, Dh)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, Dh)
            if self.backend == "sdpa":
                x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh)
            else:  # "math": the reference; also what the flop counter sees
                attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
                x = attn.softmax(dim=-1) @ v  # (B, H, N, Dh)
            x = x.transpose(1, 2)  # (B, N, H, Dh)
        return self.proj(x.reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf), as timm / MAE
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero the residual branch of whole samples with probability p, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1)
    return x * mask.div_(keep)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_rate: float, backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path_rate = drop_rate  # stochastic depth probability of this block

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class VisionTransformer(nn.Module):
    num_prefix_tokens = 1  # always a class token (MAE / timm layout); avg pooling averages patch tokens only

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        global_pool: str = "avg",
        pos_embed: str = "learned",
        drop_path: float = 0.0,
        attn_backend: str = "sdpa",
        grad_checkpointing: bool = False,
        head_init_std: float = 2e-5,
    ):
        super().__init__()
        if global_pool not in ("avg", "token"):
            raise ValueError(f"global_pool must be 'avg' or 'token', got {global_pool!r}")
        if pos_embed not in ("learned", "sincos"):
            raise ValueError(f"pos_embed must be 'learned' or 'sincos', got {pos_embed!r}")
        _check_backend(attn_backend)
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.global_pool, self.pos_embed_type = global_pool, pos_embed
        self.num_classes, self.embed_dim, self.depth = num_classes, embed_dim, depth
        self.head_init_std = head_init_std
        self.grad_checkpointing = grad_checkpointing

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # sincos stays a Parameter (frozen) so state dicts match the learned layout
        self.pos_embed = nn.Parameter(
            torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim), requires_grad=pos_embed == "learned"
        )
        # stochastic depth rate rises linearly over the blocks (plain Python: no .item(), works on meta)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rates[i], attn_backend) for i in range(depth)
        )
        # timm: the final norm sits on the tokens for class-token pooling, on the pooled vector for avg
        use_fc_norm = global_pool == "avg"
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """MAE / timm initialisation. Also call it after ``to_empty()`` on a model built on the meta device."""
        self.init_pos_embed(self.pos_embed_type)
        nn.init.normal_(self.cls_token, std=0.02)
        proj = self.patch_embed.proj
        proj.reset_parameters()  # default conv bias, as MAE leaves it
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))  # as a linear layer on patches
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=self.head_init_std)
            nn.init.zeros_(self.head.bias)

    @torch.no_grad()
    def init_pos_embed(self, kind: str) -> None:
        """'sincos': MAE's fixed 2-D table (zero class-token row); 'learned': truncated normal, std 0.02.
        Only the values: whether the table trains stays as built (``model.pos_embed``)."""
        if kind == "sincos":
            pe = get_2d_sincos_pos_embed(self.embed_dim, self.patch_embed.grid_size, cls_token=True)
            self.pos_embed.copy_(pe.unsqueeze(0))  # (1, 1+N, D)
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    # --- forward -------------------------------------------------------------------------------------
    def patchify_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with their position embedding, no class token: (B, C, H, W) -> (B, N, D).
        MAE masks these before ``prepend_cls``."""
        return self.patch_embed(x) + self.pos_embed[:, self.num_prefix_tokens :]

    def prepend_cls(self, x: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1)  # (B, 1+N, D)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks (checkpointed when enabled and training) then ``norm``: (B, T, D) -> (B, T, D)."""
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if ckpt else blk(x)
        return self.norm(x)  # Identity for avg pooling

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1+N, D)
        return self.forward_tokens(self.prepend_cls(self.patchify_embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)  # (B, D): patch tokens only
        else:
            x = x[:, 0]  # (B, D): class token
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # --- training helpers ----------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @property
    def num_layers(self) -> int:
        return self.depth + 1

    def layer_id(self, param_name: str) -> int:
        """Layer index for layer-wise lr decay (BEiT / MAE rule); scale = decay ** (num_layers - layer_id)."""
        for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
            param_name = param_name.removeprefix(prefix)
        if param_name in ("cls_token", "pos_embed") or param_name.startswith("patch_embed."):
            return 0
        if param_name.startswith("blocks."):
            return int(param_name.split(".")[1]) + 1
        return self.depth + 1

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_attn_backend(self, backend: str) -> None:
        _check_backend(backend)
        for blk in self.blocks:
            blk.attn.backend = backend

    @property
    def attn_backend(self) -> str:
        return self.blocks[0].attn.backend if len(self.blocks) else "sdpa"


def build_vit(arch: str, **overrides) -> VisionTransformer:
    """``build_vit("vit_base_patch16", num_classes=100, drop_path=0.1)``; overrides win over the arch."""
    if arch not in ARCHS:
        near = difflib.get_close_matches(arch, list(ARCHS), n=1, cutoff=0.0)
        raise ValueError(f"unknown ViT arch {arch!r}; did you mean {near[0]!r}? Valid: {', '.join(ARCHS)}")
    return VisionTransformer(**{**ARCHS[arch], **overrides})


def _unwrap(state_dict: dict) -> dict:
    # {"model": sd} is how MAE / DeiT checkpoints are stored; DDP and torch.compile add prefixes
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def load_vit_state_dict(model: VisionTransformer, state_dict: dict, *, strict_head: bool = False) -> dict:
    """Load a timm / MAE state dict into ``model`` and report what happened.

    Returns ``{"loaded", "ignored", "new", "resampled"}`` (lists of keys). ``pos_embed`` is resampled to the
    model's grid when they differ; checkpoint keys the model lacks (MAE ``decoder_*``, ``mask_token``,
    ``norm.*`` for an avg-pool model) are ignored; model keys the checkpoint lacks keep their init and are
    "new". An MAE ``norm.*`` is deliberately *not* copied into ``fc_norm.*`` (MAE fine-tuning starts fc_norm
    fresh). A ``head.*`` of another shape is skipped (reported new) unless ``strict_head``; any other shape
    mismatch raises ``ValueError`` listing every mismatched key with both shapes.
    """
    sd = _unwrap(state_dict)
    own = model.state_dict()
    to_load: dict[str, torch.Tensor] = {}
    report: dict[str, list[str]] = {"loaded": [], "ignored": [], "new": [], "resampled": []}
    mismatched: list[str] = []
    for k, v in sd.items():
        if k not in own or not isinstance(v, torch.Tensor):
            report["ignored"].append(k)
            continue
        want = own[k].shape
        if k == "pos_embed" and v.shape != want and v.ndim == 3 and v.shape[-1] == want[-1]:
            n_old = v.shape[1] - model.num_prefix_tokens
            if math.isqrt(n_old) ** 2 == n_old:  # only square checkpoint grids can be inferred
                v = resample_pos_embed(v, model.patch_embed.grid_size, model.num_prefix_tokens)
                report["resampled"].append(k)
        if v.shape != want:
            if k.startswith("head.") and not strict_head:
                continue  # reported as new below
            mismatched.append(f"  {k}: checkpoint {tuple(v.shape)} vs model {tuple(want)}")
            continue
        to_load[k] = v
    if mismatched:
        raise ValueError(
            f"checkpoint does not fit the model ({len(mismatched)} shape mismatches):\n" + "\n".join(mismatched)
        )
    model.load_state_dict(to_load, strict=False)
    report["loaded"] = list(to_load)
    report["new"] = [k for k in own if k not in to_load]
    return report
