"""MAE pre-training model (He et al., 2022) with the exact state-dict layout of MAE's ``MaskedAutoencoderViT``.

The encoder *is* the module (``MaskedAutoencoder`` subclasses ``VisionTransformer``), so its keys sit at the top
level exactly as in ``mae_pretrain_vit_*.pth``: ``cls_token``, ``pos_embed``, ``mask_token``, ``decoder_pos_embed``,
``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``, ``decoder_embed.*``, ``decoder_blocks.N.*``, ``decoder_norm.*``,
``decoder_pred.*`` (same order too). ``encoder_state_dict`` keeps what fine-tuning consumes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from engine.config import MaeConfig, ModelConfig

from .build import arch_spec, backend_checked
from .pos_embed import get_2d_sincos_pos_embed
from .vit import Block, VisionTransformer

DECODER_KEYS = ("mask_token", "decoder_")  # a state-dict key starting with one of these is not the encoder's


class MaskedAutoencoder(VisionTransformer):
    """ViT encoder (class-token layout, fixed sin-cos positions, no head) + MAE's light decoder."""

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        attn_backend: str = "sdpa",
        grad_checkpointing: bool = False,
    ):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
                         embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         global_pool="token", pos_embed="sincos", attn_backend=attn_backend,
                         grad_checkpointing=grad_checkpointing)
        if decoder_dim % 4:
            raise ValueError(f"decoder_dim must be divisible by 4 (sin-cos positions), got {decoder_dim}")
        self.patch_size, self.in_chans = patch_size, in_chans
        self.decoder_dim = decoder_dim
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        n = self.patch_embed.num_patches
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + n, decoder_dim), requires_grad=False)
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio, True, 0.0, attn_backend) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size**2 * in_chans)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """MAE's ``initialize_weights``: sin-cos tables, xavier linears (and patch projection), N(0, .02) tokens."""
        if not hasattr(self, "decoder_pred"):  # called by VisionTransformer.__init__ before the decoder exists
            return
        super().init_weights()  # encoder tables + every Linear / LayerNorm, decoder included
        pe = get_2d_sincos_pos_embed(self.decoder_dim, self.patch_embed.grid_size, cls_token=True)
        self.decoder_pos_embed.copy_(pe.unsqueeze(0))  # (1, 1+N, Dd)
        nn.init.normal_(self.mask_token, std=0.02)

    # --- pixels <-> patches -----------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C), MAE's order ('nchpwq->nhwpqc')."""
        p, c = self.patch_size, self.in_chans
        h, w = imgs.shape[2] // p, imgs.shape[3] // p
        x = imgs.reshape(imgs.shape[0], c, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(imgs.shape[0], h * w, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W); the inverse of ``patchify``."""
        p, c = self.patch_size, self.in_chans
        h, w = self.patch_embed.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    # --- masking ----------------------------------------------------------------------------------------
    @staticmethod
    def random_masking(x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None):
        """Per-sample random masking by argsort of uniform noise, all on the device.

        x: (B, N, D) -> x_visible (B, keep, D) with keep = int(N * (1 - mask_ratio)), mask (B, N) with 1 = removed
        (in x's dtype), ids_restore (B, N) such that gathering [visible, removed] with it restores patch order.
        ``generator`` must live on x's device.
        """
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        B, N, D = x.shape
        keep = int(N * (1 - mask_ratio))
        noise = torch.rand(B, N, device=x.device, generator=generator)  # (B, N)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first `keep` are kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, N)
        ids_keep = ids_shuffle[:, :keep]  # (B, keep)
        x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))  # (B, keep, D)
        mask = torch.ones(B, N, device=x.device, dtype=x.dtype)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # (B, N) in patch order
        return x_visible, mask, ids_restore

    # --- forward ----------------------------------------------------------------------------------------
    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None):
        """(B, C, H, W) -> latent (B, 1+keep, D), mask (B, N), ids_restore (B, N)."""
        x = self.patchify_embed(imgs)  # (B, N, D) with positions
        x, mask, ids_restore = self.random_masking(x, mask_ratio, generator)  # (B, keep, D)
        x = self.prepend_cls(x)  # (B, 1+keep, D)
        return self.forward_tokens(x), mask, ids_restore  # blocks + norm

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, 1+keep, D), ids_restore (B, N) -> pixel predictions (B, N, p*p*C) in patch order."""
        x = self.decoder_embed(latent)  # (B, 1+keep, Dd)
        B, T, Dd = x.shape
        N = ids_restore.shape[1]
        mask_tokens = self.mask_token.to(x.dtype).expand(B, N + 1 - T, -1)  # (B, N-keep, Dd)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, N, Dd), shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))  # unshuffle
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # (B, 1+N, Dd)
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.decoder_blocks:
            x = checkpoint(blk, x, use_reentrant=False) if ckpt else blk(x)
        x = self.decoder_pred(self.decoder_norm(x))  # (B, 1+N, p*p*C)
        return x[:, 1:]  # drop the class token

    def patch_target(self, imgs: torch.Tensor) -> torch.Tensor:
        """What the decoder regresses: patches, per-patch normalised when ``norm_pix_loss``. (B, N, p*p*C)."""
        target = self.patchify(imgs.float())
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the masked patches only (float32)."""
        loss = (pred.float() - self.patch_target(imgs)).pow(2).mean(dim=-1)  # (B, N)
        mask = mask.float()
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None,
                generator: torch.Generator | None = None):
        """-> (loss, pred (B, N, p*p*C), mask (B, N)); ``mask_ratio`` defaults to the one built with."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    # --- training helpers -------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        # MAE's pre-training exempts only 1-D parameters and biases: cls_token and mask_token ARE decayed.
        # The two position tables are frozen, so the optimizer never sees them.
        return {"pos_embed", "decoder_pos_embed"}

    @property
    def num_layers(self) -> int:
        return 0  # pre-training has no layer-wise lr decay: the optimizer treats the model as one layer

    def set_attn_backend(self, backend: str) -> None:
        super().set_attn_backend(backend)
        for blk in self.decoder_blocks:
            blk.attn.backend = backend


def build_mae(model_cfg: ModelConfig, mae_cfg: MaeConfig) -> MaskedAutoencoder:
    """The encoder size comes from ``model.arch`` (plus img_size, in_chans, attn_backend, grad_checkpointing);
    the decoder and masking from ``mae``. ``model.pos_embed`` / ``global_pool`` / ``num_classes`` /
    ``drop_path`` do not apply to pre-training (MAE: fixed sin-cos positions, class token, no head)."""
    arch = arch_spec(model_cfg)
    return backend_checked(lambda: MaskedAutoencoder(
        **arch, img_size=model_cfg.img_size, in_chans=model_cfg.in_chans, decoder_dim=mae_cfg.decoder_dim,
        decoder_depth=mae_cfg.decoder_depth, decoder_heads=mae_cfg.decoder_heads, mask_ratio=mae_cfg.mask_ratio,
        norm_pix_loss=mae_cfg.norm_pix_loss, attn_backend=model_cfg.attn_backend,
        grad_checkpointing=model_cfg.grad_checkpointing))


def encoder_state_dict(mae: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's weights (timm / MAE key names), without ``mask_token`` and ``decoder_*``: what fine-tuning
    loads. Accepts a DDP / torch.compile wrapper (their prefixes are removed)."""
    out = {}
    for k, v in mae.state_dict().items():
        for prefix in ("module.", "_orig_mod."):
            k = k.removeprefix(prefix)
        if not k.startswith(DECODER_KEYS):
            out[k] = v
    return out
