"""Data for the three Semi-ViT stages: build_data(...) -> StageData of BatchStreams.

Sources: 'digits' (embedded, in memory, augmented on the device: digits.py, tensor_augment.py) and
'imagefolder' (ImageNet layout + community index CSVs, CPU decode in DataLoader workers: imagefolder.py,
transforms.py, pil_randaug.py; or NVIDIA DALI pipelines: dali.py). Order and sharding: sampler.py. Label
splits: splits.py. Unreadable images: `python -m dataloading.validate ROOT [--out FILE]` (exclude.py).
Index files: `python -m dataloading.make_index ROOT ...`. The user's text files (index CSVs, exclusion lists,
the --cfg TOML) are read as UTF-8 by textfile.py. The digits as a JPEG folder:
`python -m dataloading.export_digits OUT`.

The exports load lazily, so `python -m dataloading.validate` starts without importing torch.
"""

from typing import TYPE_CHECKING

__all__ = ["build_data", "StageData", "BatchStream", "describe_data"]

if TYPE_CHECKING:  # pragma: no cover
    from dataloading.build import build_data, describe_data
    from dataloading.streams import BatchStream, StageData


def __getattr__(name: str):
    if name in ("build_data", "describe_data"):
        from dataloading import build  # lazy: start-up cost (torch), see above
        return getattr(build, name)
    if name in ("BatchStream", "StageData"):
        from dataloading import streams  # lazy: start-up cost (torch), see above
        return getattr(streams, name)
    raise AttributeError(f"module 'dataloading' has no attribute '{name}'")
