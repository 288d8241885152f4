"""Hot operations of the Semi-ViT semi-supervised step, one public function each.

Each module holds the plain torch spec (``*_reference``), the vectorised torch version and the public
function that dispatches (``kernels.dispatch``) to the Triton kernels (``kernels.triton_ops``, CUDA),
the native C++ ops (``kernels/csrc``, CPU, built by ``CMakeLists.txt``), torch or the reference.
``python -m kernels`` prints which one each op uses here; docs/kernels.md has the contract.
"""

from kernels.dispatch import BACKENDS, KernelUnavailable
from kernels.ema import ema_tensors, ema_update, ema_update_reference, flatten_into_buffers
from kernels.pseudo_label import pseudo_label, pseudo_label_reference
from kernels.pseudo_mixup import (
    MixDraws,
    MixedBatch,
    draw_mix_randomness,
    labelled_mixup,
    mix_batch,
    pseudo_mixup,
    pseudo_mixup_reference,
)
from kernels.soft_target_ce import soft_target_cross_entropy, soft_target_cross_entropy_reference

__all__ = [
    "BACKENDS",
    "KernelUnavailable",
    "MixDraws",
    "MixedBatch",
    "draw_mix_randomness",
    "ema_tensors",
    "ema_update",
    "ema_update_reference",
    "flatten_into_buffers",
    "labelled_mixup",
    "mix_batch",
    "pseudo_label",
    "pseudo_label_reference",
    "pseudo_mixup",
    "pseudo_mixup_reference",
    "soft_target_cross_entropy",
    "soft_target_cross_entropy_reference",
]
