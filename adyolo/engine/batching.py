"""Split a global batch into micro-batch x ranks x gradient accumulation."""

from __future__ import annotations

from dataclasses import dataclass


class BatchSplitError(ValueError):
    pass


@dataclass(frozen=True)
class BatchSplit:
    global_batch: int
    micro_batch: int  # images per rank per forward pass
    world_size: int
    accumulation: int  # forward/backward passes per optimizer step

    def __str__(self) -> str:
        return (
            f"global batch {self.global_batch} = micro-batch {self.micro_batch} x {self.world_size} "
            f"rank{'s' if self.world_size > 1 else ''} x {self.accumulation} accumulation step"
            f"{'s' if self.accumulation > 1 else ''}"
        )


def split_global_batch(global_batch: int, world_size: int, micro_batch: int | None = None) -> BatchSplit:
    """`micro_batch` None: as large as possible (global / ranks, no accumulation)."""
    if global_batch % world_size:
        divisors = [n for n in range(1, global_batch + 1) if global_batch % n == 0]
        raise BatchSplitError(
            f"train.global_batch={global_batch} does not divide over {world_size} ranks; use a global batch "
            f"that is a multiple of {world_size} (e.g. {world_size * max(1, round(global_batch / world_size))}) "
            f"or a rank count among {divisors}"
        )
    per_rank = global_batch // world_size
    if micro_batch is None:
        micro_batch = per_rank
    if per_rank % micro_batch:
        options = [n for n in range(1, per_rank + 1) if per_rank % n == 0]
        raise BatchSplitError(
            f"train.micro_batch={micro_batch} does not divide the {per_rank} images per rank "
            f"(global_batch {global_batch} / {world_size} ranks); use one of {options}"
        )
    return BatchSplit(global_batch, micro_batch, world_size, per_rank // micro_batch)


def micro_batch_candidates(global_batch: int, world_size: int) -> list[int]:
    """Micro-batch sizes that split the per-rank batch exactly, largest first."""
    per_rank = split_global_batch(global_batch, world_size).micro_batch
    return [n for n in range(per_rank, 0, -1) if per_rank % n == 0]
