"""`train.micro_batch: auto`: the largest micro-batch whose training step fits the GPU.

Candidates are the largest micro-batches of the splits with 1, 2, 3, ... accumulation steps, largest
first, so the global batch stays exact and accumulation makes up the rest; every rank probes, and the
ranks take the smallest answer (`agree_on_micro_batch`). Each candidate is probed with one real
optimizer step, `TrainStep` on a bare model (forward, loss, backward, optimizer step with its state, EMA
update), on a synthetic batch, with this process limited to `train.auto_batch_memory_fraction` of the GPU. The rest
is held back for what one bare step does not allocate: DDP's gradient buckets or DeepSpeed's
partitions and communication buffers, the loader's pinned batches, fragmentation over a long run.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
from collections.abc import Callable, Sequence

import torch
from accelerate import Accelerator

from adyolo.data.batch import synthetic_batch
from adyolo.engine.accelerator import Launch
from adyolo.engine.batching import micro_batch_candidates, split_global_batch
from adyolo.engine.config import OptimConfig, TrainConfig
from adyolo.engine.setup import bare_step
from adyolo.loss.config import LossConfig
from adyolo.model import ModelConfig

# Near the limit, cuBLAS and cuDNN fail to allocate their handles or workspaces with plain RuntimeErrors
# rather than torch's OutOfMemoryError; these are the same "does not fit" answer.
OUT_OF_MEMORY_MESSAGES = (
    "out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
    "unable to find an engine",  # cuDNN v8/v9: no engine whose workspace fits
)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` says the device ran out of memory (torch's OutOfMemoryError, or a cuBLAS / cuDNN
    allocation failure raised as RuntimeError)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in OUT_OF_MEMORY_MESSAGES)


def largest_fitting(candidates: Sequence[int], fits: Callable[[int], None]) -> int:
    """The first candidate for which `fits` returns without running out of device memory."""
    for micro in candidates:
        try:
            fits(micro)
            return micro
        except RuntimeError as err:  # OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(err):
                raise
            del err  # its traceback holds the failed step's tensors
            gc.collect()
            torch.cuda.empty_cache()
    raise RuntimeError(
        f"not even a micro-batch of {candidates[-1]} fits this GPU; lower model.img_size or model.size, "
        f"or enable model.checkpoint=[all]"
    )


def probe_step(
    model_cfg: ModelConfig, loss_cfg: LossConfig, optim: OptimConfig, train: TrainConfig, precision: str, device
) -> Callable[[int], None]:
    """A function that runs one optimizer step of this configuration at a given micro-batch on `device`
    (CUDA), within `train.auto_batch_memory_fraction` of it, raising out-of-memory if it does not fit."""

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


def agree_on_micro_batch(accelerator: Accelerator, launch: Launch, fits: Callable[[int], None]) -> Launch:
    """`train.micro_batch: auto` on a GPU: every rank probes the planned micro-batch and steps down to the
    largest that really fits (`fits` raises out-of-memory); the ranks take the smallest of their answers
    (a collective), so all run the same accumulation. Returns the launch with that split, set on the
    Accelerator (before `prepare`)."""
    split = launch.split
    candidates = micro_batch_candidates(split.global_batch, split.world_size)
    mine = largest_fitting([m for m in candidates if m <= split.micro_batch], fits)
    everyone = accelerator.gather(torch.tensor([mine], device=accelerator.device))
    agreed = int(everyone.min())
    if agreed != split.micro_batch:
        split = split_global_batch(split.global_batch, split.world_size, agreed)
        accelerator.gradient_accumulation_steps = split.accumulation
        if launch.settings.deepspeed is not None:
            accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = split.micro_batch
    return dataclasses.replace(launch, split=split)
