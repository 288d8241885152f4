"""Models: the ViT family, position embeddings, cost counters."""

from .flops import forward_gflops, param_count
from .pos_embed import get_2d_sincos_pos_embed, resample_pos_embed
from .vit import ARCHS, ATTN_BACKENDS, VisionTransformer, build_vit, load_vit_state_dict

__all__ = [
    "ARCHS",
    "ATTN_BACKENDS",
    "VisionTransformer",
    "build_vit",
    "forward_gflops",
    "get_2d_sincos_pos_embed",
    "load_vit_state_dict",
    "param_count",
    "resample_pos_embed",
]
