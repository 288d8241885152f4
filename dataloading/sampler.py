"""Which samples a rank reads, in which order, for every epoch: seeded, sharded, resumable.

Replaces torch's DistributedSampler. The order is a pure function of (seed, stream, epoch): a new
permutation every epoch even on one process (the original code only called set_epoch when distributed,
so a single GPU saw the same order every epoch), identical on every rank, and each rank takes its own
strided shard of it. `start` skips whole batches without touching the skipped samples (exact resume).

Train streams (shuffle, drop_last): every rank gets N // world_size samples and drops the last partial
batch, so all ranks run the same number of steps. Eval streams (no shuffle, keep last): rank r gets
samples r, r + W, r + 2W, ...: every sample exactly once across ranks, nothing padded, so a rank may get
a smaller last batch or one batch fewer.

A labelled set smaller than one batch per rank (a few labels per class) is normal in semi-supervised
training: with `repeat`, such a stream repeats the set, reshuffled every pass (as the original's sampler
does), so every epoch is exactly one full batch per rank.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

_MASK64 = (1 << 64) - 1


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that is a fixed function of `keys` (any ints, negative allowed), well mixed."""
    words = [int(k) & _MASK64 for k in keys]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1)


class ShardedSampler:
    """Sample positions 0..num_samples-1 for one rank: `shard(epoch)` in order, `batches(epoch, start)`."""

    def __init__(self, num_samples: int, batch_size: int, *, seed: int, stream: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, drop_last: bool | None = None, repeat: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed, self.stream = int(seed), int(stream)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle = bool(shuffle)
        self.drop_last = self.shuffle if drop_last is None else bool(drop_last)
        # passes over the set per epoch: more than 1 only when a repeating stream is smaller than a batch
        self.passes = 1
        if repeat and self.shuffle and self.num_samples // self.world_size < self.batch_size:
            if self.num_samples == 0:
                raise ValueError("a repeating stream needs at least one sample")
            self.passes = -(-self.batch_size * self.world_size // self.num_samples)
        if self.drop_last:
            self.per_rank = self.num_samples * self.passes // self.world_size  # equal on every rank
            self.num_batches = self.per_rank // self.batch_size
        else:
            self.per_rank = len(range(self.rank, self.num_samples, self.world_size))
            self.num_batches = -(-self.per_rank // self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def epoch_seed(self, epoch: int) -> int:
        return derive_seed(self.seed, self.stream, epoch)

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's sample positions for `epoch`, in the order they are read (int64)."""
        if self.shuffle and self.passes > 1:  # a new permutation for every pass
            rng = np.random.default_rng(self.epoch_seed(epoch))
            order = np.concatenate([rng.permutation(self.num_samples) for _ in range(self.passes)])
        elif self.shuffle:
            order = np.random.default_rng(self.epoch_seed(epoch)).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        if self.drop_last:
            order = order[: self.per_rank * self.world_size]
        shard = order[self.rank:: self.world_size]
        if self.drop_last:
            shard = shard[: self.num_batches * self.batch_size]
        return shard.astype(np.int64, copy=False)

    def batches(self, epoch: int, start: int = 0) -> Iterator[np.ndarray]:
        """Batches of positions from batch `start` on (0 <= start <= len(self))."""
        if not 0 <= start <= self.num_batches:
            raise ValueError(f"start={start} is outside 0..{self.num_batches} (batches per epoch)")
        shard = self.shard(epoch)
        for b in range(start, self.num_batches):
            yield shard[b * self.batch_size: (b + 1) * self.batch_size]


class EpochBatchSampler:
    """A DataLoader `batch_sampler` over a ShardedSampler: call `set_epoch(epoch, start)` before iterating.

    Each element is `(position, seed)`: the dataset seeds the sample's augmentation from `seed`, a function
    of (run seed, stream, epoch, position) only, so the augmentations do not depend on which worker reads
    the sample or on where the epoch was resumed.
    """

    def __init__(self, sampler: ShardedSampler):
        self.sampler = sampler
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= len(self.sampler):
            raise ValueError(f"start={start} is outside 0..{len(self.sampler)} (batches per epoch)")
        self.epoch, self.start = int(epoch), int(start)

    def __len__(self) -> int:
        return len(self.sampler) - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        s = self.sampler
        rng = np.random.default_rng(derive_seed(s.epoch_seed(self.epoch), 0x5EED))
        seeds = rng.integers(0, 2**63 - 1, size=s.num_samples * s.passes, dtype=np.int64)
        shard = s.shard(self.epoch)
        keys = shard.copy()
        if s.passes > 1:  # a sample repeated within the epoch draws a new augmentation each time
            seen: dict[int, int] = {}
            for j, i in enumerate(shard.tolist()):
                keys[j] = i + s.num_samples * seen.get(i, 0)
                seen[i] = seen.get(i, 0) + 1
        for b in range(self.start, len(s)):
            sl = slice(b * s.batch_size, (b + 1) * s.batch_size)
            yield [(int(i), int(seeds[k])) for i, k in zip(shard[sl], keys[sl])]
