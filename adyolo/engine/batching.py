"""A global batch split over ranks and gradient accumulation, and the sampler that realises the split.

Every optimizer step trains on exactly `global_batch` images, whatever the number of ranks W: each rank
gets floor(G / W) or ceil(G / W) of them (the first G mod W ranks the larger share), in `accumulation`
micro-batches of sizes as equal as possible. So 40 images go over 16 ranks as 8 ranks x 3 + 8 ranks x 2,
and over 3 ranks as 14 + 13 + 13. Every rank runs the same number of micro-batches per step (their
collectives pair up); the loss of each micro-batch is its part of the global batch's loss
(`adyolo.loss.criterion.LossNorm`), so the step's gradient is the same for every split.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from adyolo.data.batch import synthetic_batch


class BatchSplitError(ValueError):
    pass


@dataclass(frozen=True)
class BatchSplit:
    global_batch: int
    world_size: int
    accumulation: int  # forward/backward passes per rank per optimizer step

    def __post_init__(self) -> None:
        if not 1 <= self.world_size <= self.global_batch:
            raise BatchSplitError(
                f"train.global_batch={self.global_batch} cannot be split over {self.world_size} ranks: every rank "
                f"needs at least one image per step; launch at most {self.global_batch} "
                f"process{'es' if self.global_batch > 1 else ''}, or raise "
                "train.global_batch"
            )
        if not 1 <= self.accumulation <= self.global_batch // self.world_size:
            raise BatchSplitError(
                f"{self.accumulation} accumulation steps leave a micro-batch of {self.global_batch} images over "
                f"{self.world_size} ranks empty; at most {self.global_batch // self.world_size}"
            )

    def rank_images(self, rank: int) -> int:
        """Images rank `rank` trains on per optimizer step: floor(G / W), +1 for the first G mod W ranks."""
        return self.global_batch // self.world_size + (rank < self.global_batch % self.world_size)

    def micro_sizes(self, rank: int) -> list[int]:
        """The sizes of rank `rank`'s micro-batches in one optimizer step, largest first."""
        images = self.rank_images(rank)
        return [images // self.accumulation + (j < images % self.accumulation) for j in range(self.accumulation)]

    @property
    def micro_batch(self) -> int:
        """The largest micro-batch of any rank: what the memory of a rank must hold."""
        return math.ceil(self.rank_images(0) / self.accumulation)

    @property
    def smallest_micro_batch(self) -> int:
        """The smallest micro-batch of any rank (the last rank's last one)."""
        return self.micro_sizes(self.world_size - 1)[-1]

    @property
    def even(self) -> bool:
        """Whether every micro-batch of every rank has the same size."""
        return self.global_batch % (self.world_size * self.accumulation) == 0

    def shares(self) -> list[tuple[int, int]]:
        """[(ranks, images per step)] from the larger share down: [(8, 3), (8, 2)] for 40 over 16 ranks."""
        large, extra = self.rank_images(0), self.global_batch % self.world_size
        return [(extra, large), (self.world_size - extra, large - 1)] if extra else [(self.world_size, large)]

    def __str__(self) -> str:
        steps = f"{self.accumulation} accumulation step{'s' if self.accumulation > 1 else ''}"
        if self.even:
            ranks = f"{self.world_size} rank{'s' if self.world_size > 1 else ''}"
            return f"global batch {self.global_batch} = micro-batch {self.micro_batch} x {ranks} x {steps}"
        parts = " + ".join(f"{n} rank{'s' if n > 1 else ''} x {images}" for n, images in self.shares())
        micros = sorted({m for r in (0, self.world_size - 1) for m in self.micro_sizes(r)}, reverse=True)
        return (
            f"global batch {self.global_batch} = {parts} images (micro-batch {' / '.join(map(str, micros))}, {steps})"
        )


def split_global_batch(global_batch: int, world_size: int, micro_batch: int | None = None) -> BatchSplit:
    """The split whose micro-batches hold at most `micro_batch` images (None: one micro-batch per rank and
    step, no accumulation). Raises `BatchSplitError` when there are more ranks than images."""
    if not 1 <= world_size <= global_batch:
        BatchSplit(global_batch, world_size, 1)  # raises, naming the limit
    per_rank = math.ceil(global_batch / world_size)
    if micro_batch is None or micro_batch >= per_rank:
        return BatchSplit(global_batch, world_size, 1)
    if micro_batch < 1:
        raise BatchSplitError(f"train.micro_batch={micro_batch} must be at least 1")
    accumulation = math.ceil(per_rank / micro_batch)
    smallest = global_batch // world_size
    if accumulation > smallest:
        least = BatchSplit(global_batch, world_size, smallest).micro_batch
        raise BatchSplitError(
            f"train.micro_batch={micro_batch} needs {accumulation} micro-batches per step, but the ranks with "
            f"{smallest} of the {global_batch} images cannot fill them; use train.micro_batch >= {least}"
        )
    return BatchSplit(global_batch, world_size, accumulation)


def micro_batch_candidates(global_batch: int, world_size: int) -> list[int]:
    """The distinct largest micro-batches of the splits with 1, 2, ... accumulation steps, largest first."""
    smallest = global_batch // world_size
    return sorted({BatchSplit(global_batch, world_size, a).micro_batch for a in range(1, smallest + 1)}, reverse=True)


class GlobalBatchSampler(torch.utils.data.Sampler[list[int]]):
    """This rank's micro-batches (lists of dataset indices) of a training epoch under `split`.

    An epoch is a permutation of the dataset, seeded with seed + epoch (for `shuffle`; the order
    Accelerate's seedable sampler gives), cut into whole optimizer steps of `global_batch` images (the
    rest is dropped). Within a step, micro-batch j of every rank is taken in rank order: with one rank and
    no accumulation the batches are the permutation's consecutive slices. Every image of the epoch's steps
    goes to exactly one rank once. `set_epoch` picks the epoch, `skip` the micro-batches already trained on.
    """

    def __init__(self, length: int, split: BatchSplit, rank: int, seed: int, shuffle: bool = True):
        if length < split.global_batch:
            raise ValueError(f"{length} images are fewer than one global batch of {split.global_batch}")
        self.length, self.split, self.rank, self.seed, self.shuffle = length, split, rank, seed, shuffle
        self.epoch = 0
        self.skipped = 0
        self.steps = length // split.global_batch  # optimizer steps per epoch
        sizes = [split.micro_sizes(r) for r in range(split.world_size)]
        # Offsets of this rank's micro-batches within a step's images.
        self._slices = []
        start = 0
        for j in range(split.accumulation):
            for r in range(split.world_size):
                if r == rank:
                    self._slices.append((start, start + sizes[r][j]))
                start += sizes[r][j]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.skipped = 0

    def skip(self, micro_batches: int) -> None:
        """Start the current epoch after this rank's first `micro_batches` (a resumed run)."""
        self.skipped = micro_batches

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.length))
        return torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        g = self.split.global_batch
        for i in range(self.skipped, len(self)):
            step, j = divmod(i, self.split.accumulation)
            start, end = self._slices[j]
            yield order[step * g + start : step * g + end]

    def __len__(self) -> int:
        return self.steps * self.split.accumulation


def synthetic_micro_batches(split: BatchSplit, rank: int, img_size: int, device: torch.device) -> Iterator[dict]:
    """Rank `rank`'s micro-batches of `split` as synthetic batches kept on `device`, step after step:
    what the benchmark times and the plan's measurement trains on."""
    return itertools.cycle([synthetic_batch(m, img_size, device, seed=rank) for m in split.micro_sizes(rank)])
