"""`train.micro_batch: auto`: the largest micro-batch whose training step fits the GPU.

Candidates are the divisors of the per-rank batch, largest first, so the global batch stays
exact and accumulation makes up the rest. Each candidate is probed with one real optimizer step,
`TrainStep` on a bare model (forward, loss, backward, optimizer step with its state, EMA update), on a
synthetic batch, with this process limited to `train.auto_batch_memory_fraction` of the GPU. The rest
is held back for what one bare step does not allocate: DDP's gradient buckets or DeepSpeed's
partitions and communication buffers, the loader's pinned batches, fragmentation over a long run.
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Callable, Sequence

import torch

from adyolo.data.batch import synthetic_batch
from adyolo.engine.config import OptimConfig, TrainConfig
from adyolo.engine.setup import bare_step
from adyolo.loss.config import LossConfig
from adyolo.model import ModelConfig


def largest_fitting(candidates: Sequence[int], fits: Callable[[int], None]) -> int:
    """The first candidate for which `fits` returns without a CUDA out-of-memory error."""
    for micro in candidates:
        try:
            fits(micro)
            return micro
        except torch.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
    raise RuntimeError(
        f"not even a micro-batch of {candidates[-1]} fits this GPU; lower model.img_size or model.size, "
        f"or enable model.checkpoint=[all]"
    )


def probe_step(
    model_cfg: ModelConfig, loss_cfg: LossConfig, optim: OptimConfig, train: TrainConfig
) -> Callable[[str, torch.device], Callable[[int], None]]:
    """For `build_accelerator`: (precision, device) -> a function that runs one optimizer step of this
    configuration at a given micro-batch on `device`, raising `torch.OutOfMemoryError` if it does not fit."""

    def probe(precision: str, device: torch.device) -> Callable[[int], None]:
        def fits(micro: int) -> None:
            torch.cuda.set_per_process_memory_fraction(train.auto_batch_memory_fraction, device)
            try:
                dtype = torch.bfloat16 if precision == "bf16" else None
                step = bare_step(model_cfg, loss_cfg, optim, train, device, dtype)
                step.run_window(itertools.repeat(synthetic_batch(micro, model_cfg.img_size, device)), step=0)
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0, device)
                torch.cuda.empty_cache()

        return fits

    return probe
