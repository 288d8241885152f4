"""timm-style RandAugment policy strings ('rand-m9-mstd0.5-inc1') parsed into a small spec.

Magnitude follows timm's scale: a level 0..10 (timm's _LEVEL_DENOM), so m9 means 90 % of each op's
maximum (rotate 27 degrees, shear 0.27, brightness factor 1 +- 0.81). torchvision's RandAugment indexes
31 bins by default, where magnitude 9 would be only 30 % of the maximum; transforms.py therefore does not
pass `m` to torchvision as a bin index.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from engine.errors import ConfigError

LEVEL_DENOM = 10.0  # timm's denominator: level / 10 = fraction of an op's maximum


@dataclass(frozen=True)
class RandAugSpec:
    magnitude: float = 10.0  # level 0..10 (timm's default when 'm' is absent)
    num_ops: int = 2  # ops drawn per image ('n')
    mstd: float = 0.0  # std of the gaussian noise added to the level per op; inf = uniform in [0, level]
    mmax: float = LEVEL_DENOM  # upper bound of the noisy level
    prob: float = 0.5  # chance each drawn op is applied ('p'; timm's default 0.5)
    increasing: bool = False  # 'inc1': severity increases with magnitude (torchvision's ops always do)

    def level(self) -> float:
        """The nominal level as a fraction of the maximum, clamped to [0, 1]."""
        return min(max(self.magnitude, 0.0), min(self.mmax, LEVEL_DENOM)) / LEVEL_DENOM


def parse_randaug(policy: str, key: str = "augment.randaug") -> RandAugSpec | None:
    """'' -> None; 'rand-m9-n2-mstd0.5-inc1-mmax10-p0.5' -> RandAugSpec. Bad strings raise ConfigError."""
    if not policy:
        return None
    parts = policy.split("-")
    example = "e.g. 'rand-m9-mstd0.5-inc1' (m = magnitude 0..10, n = ops per image, mstd = magnitude noise)"
    if parts[0] != "rand":
        raise ConfigError(key, f"'{policy}' must start with 'rand-', {example}")
    values: dict[str, float] = {}
    for part in parts[1:]:
        m = re.fullmatch(r"([a-z]+)(.*)", part)
        name, raw = (m.group(1), m.group(2)) if m else (part, "")
        if name not in ("m", "n", "mstd", "mmax", "p", "inc"):
            raise ConfigError(key, f"'{policy}': unknown part '{part}' (known: m, n, mstd, mmax, p, inc), {example}")
        try:
            values[name] = float(raw)
        except ValueError:
            raise ConfigError(key, f"'{policy}': '{part}' needs a number after '{name}', {example}") from None
    spec = RandAugSpec(
        magnitude=values.get("m", 10.0),
        num_ops=int(values.get("n", 2)),
        mstd=math.inf if values.get("mstd", 0.0) > 100 else values.get("mstd", 0.0),
        mmax=values.get("mmax", LEVEL_DENOM),
        prob=values.get("p", 0.5),
        increasing=bool(values.get("inc", 0)),
    )
    if spec.num_ops < 0 or spec.mstd < 0 or not 0.0 <= spec.prob <= 1.0 or spec.magnitude < 0:
        raise ConfigError(key, f"'{policy}': need m >= 0, n >= 0, mstd >= 0 and 0 <= p <= 1, {example}")
    return spec
