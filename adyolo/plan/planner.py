"""Per-rank peak memory of a training configuration, and the setting that fits a GPU.

    prediction = traced step tensors (affine in the micro-batch; `adyolo.plan.cost`; on a GPU traced
                 with CUDA autocast's dtypes)
               + data-parallel terms (DDP buckets, ZeRO sharding and buffers; `adyolo.plan.terms`)
               + on a GPU: the attention kernel's excess and the cuDNN / cuBLAS workspaces (allocated),
                 the allocator's reserve (reserved), and the memory outside PyTorch (CUDA context, NCCL)

`predict` gives the per-rank figures for one setting; `recommend` finds, for a global batch, a number
of GPUs and a GPU size, the setting with the least recompute (checkpointing off, then the selected
blocks, then all) and then the fewest accumulation steps (the largest micro-batch) that fits, keeping
the global batch exact.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from adyolo.engine.batching import micro_batch_candidates, split_global_batch
from adyolo.engine.config import OptimConfig, TrainConfig
from adyolo.loss.config import LossConfig
from adyolo.model import ModelConfig
from adyolo.model.config import CHECKPOINTABLE_BLOCKS_BY_NECK
from adyolo.plan.cost import StepMemory, autocast_policy, step_memory
from adyolo.plan.terms import (
    GIB,
    GpuAssumptions,
    ZeroSettings,
    attention_kernel_bytes,
    data_parallel_bytes,
    gpu_fixed_bytes,
    untouched_bucket_bytes,
    workspace_bytes,
)

# The recompute ladder, least first. "selected" checkpoints the blocks with the most activation memory
# for their compute: the stride-4 stem and stage, and for the GD neck its stride-4 top-down injection and
# the low plug point's fusion (the full variant's 80x80 self-attention at 640 px); for the yolov5face neck
# (no stride-4 level) its finest stage, the stride-8 top-down C3. A model takes the names its neck has
# (`ladder_blocks`).
CHECKPOINT_LADDER: dict[str, tuple[str, ...]] = {
    "off": (),
    "selected": ("backbone.stem", "backbone.stage1", "neck.low_fusion", "neck.inject_p2", "neck.top_down_p3"),
    "all": ("all",),
}


@dataclass(frozen=True)
class Setting:
    """How a global batch runs on `world_size` ranks."""

    micro_batch: int
    accumulation: int
    checkpoint: str  # a CHECKPOINT_LADDER key, or block names joined with "+"

    def __str__(self) -> str:
        return f"micro {self.micro_batch} x accum {self.accumulation}, ckpt {self.checkpoint}"

    @property
    def blocks(self) -> tuple[str, ...]:
        """The checkpointed blocks of any model (a ladder step lists both necks' names); `blocks_for` gives
        what one model's `model.checkpoint` takes."""
        if self.checkpoint in CHECKPOINT_LADDER:
            return CHECKPOINT_LADDER[self.checkpoint]
        return tuple(self.checkpoint.split("+"))

    def blocks_for(self, model: ModelConfig) -> tuple[str, ...]:
        """The checkpointed blocks as `model.checkpoint` takes them for this model's neck."""
        return model_blocks(self.blocks, model)


def model_blocks(blocks, model: ModelConfig) -> tuple[str, ...]:
    """`blocks` (block names or "all") less the names this model's neck does not have."""
    return _valid_only(blocks, model.checkpointable_blocks)


def _valid_only(blocks, valid) -> tuple[str, ...]:
    return tuple(b for b in blocks if b == "all" or b in valid)


def ladder_blocks(checkpoint: str, model: ModelConfig) -> tuple[str, ...]:
    """A CHECKPOINT_LADDER step's blocks as this model's `model.checkpoint` takes them."""
    return model_blocks(CHECKPOINT_LADDER[checkpoint], model)


def checkpoint_name(blocks, model: ModelConfig | None = None) -> str:
    """`model.checkpoint` as a Setting's name: its CHECKPOINT_LADDER key (that step's blocks for `model`'s
    neck; without `model`, for either neck), or the blocks joined with "+"."""
    blocks = tuple(blocks)
    necks = [model.checkpointable_blocks] if model is not None else list(CHECKPOINTABLE_BLOCKS_BY_NECK.values())
    for name, ladder in CHECKPOINT_LADDER.items():
        if ladder == blocks or any(_valid_only(ladder, valid) == blocks for valid in necks):
            return name
    return "+".join(blocks)


@dataclass
class Prediction:
    """Predicted per-rank memory of one setting, bytes; `terms` names every part of `allocated`."""

    setting: Setting
    world_size: int
    zero: str
    device: str  # "cpu" (tensor memory) or "gpu"
    terms: dict[str, float] = field(default_factory=dict)
    allocated: float = 0.0  # torch.cuda.max_memory_allocated on a GPU; live tensor bytes on a CPU
    resident: float = 0.0  # CPU: the tensor bytes that take resident memory (written pages)
    reserved: float = 0.0  # torch.cuda.max_memory_reserved (GPU)
    device_total: float = 0.0  # what the GPU must hold: reserved + memory outside PyTorch (GPU)

    def fits(self, gpu_gib: float) -> bool:
        return self.device_total <= gpu_gib * GIB


@dataclass
class Planner:
    """Predictions for one model / loss / optimizer configuration (the traces are shared)."""

    model: ModelConfig
    loss: LossConfig
    optim: OptimConfig
    train: TrainConfig
    precision: str = "bf16"
    cache_dir: Path | None = None
    gpu: GpuAssumptions = field(default_factory=GpuAssumptions)
    cpu_process_bytes: float = 0.0  # CPU predictions' device_total: a process's non-tensor memory
    _memory: dict[tuple, StepMemory] = field(default_factory=dict, repr=False)

    def step_memory(self, blocks: tuple[str, ...], device: str = "gpu") -> StepMemory:
        """The traced step line with these blocks checkpointed, in `device`'s autocast policy."""
        policy = autocast_policy(self.precision, "cuda" if device == "gpu" else "cpu")
        if (blocks, policy) not in self._memory:
            # A ladder step names both necks' blocks: the model takes its own.
            model = dataclasses.replace(self.model, checkpoint=list(model_blocks(blocks, self.model)))
            self._memory[(blocks, policy)] = step_memory(
                model, self.loss, self.optim, self.train, self.precision, self.cache_dir, policy
            )
        return self._memory[(blocks, policy)]

    def predict(self, setting: Setting, world_size: int, zero: ZeroSettings, device: str = "gpu") -> Prediction:
        memory = self.step_memory(setting.blocks, device)
        terms = {"step_tensors": memory.peak(setting.micro_batch)}
        terms.update(data_parallel_bytes(zero, world_size, memory.parameters, memory.optimizer_state))
        prediction = Prediction(setting, world_size, _zero_name(zero), device, terms)
        if device == "gpu":
            q = self.attention_q_elements(setting.micro_batch)
            terms["attention_kernel"] = attention_kernel_bytes(q, self.precision, self.gpu)
            terms["cuda_workspaces"] = workspace_bytes(self.gpu)
        prediction.allocated = sum(terms.values())
        if device == "gpu":
            prediction.reserved = prediction.allocated * self.gpu.reserve
            outside = gpu_fixed_bytes(world_size, self.gpu)
            prediction.terms.update({f"outside_pytorch.{k}": v for k, v in outside.items()})
            prediction.device_total = prediction.reserved + sum(outside.values())
        else:
            prediction.reserved = prediction.allocated
            prediction.device_total = prediction.allocated + self.cpu_process_bytes
            prediction.resident = prediction.allocated - untouched_bucket_bytes(zero, memory.parameters)
        return prediction

    def attention_q_elements(self, micro_batch: int) -> int:
        """Elements of q over the model's fused attentions (the low plug point's self-attention;
        the high point's 10x10 attention is negligible): B x channels x tokens."""
        if not self.model.uses_attention or self.model.attention != "sdpa":
            return 0
        tokens = (self.model.img_size // self.model.low_stride) ** 2
        return micro_batch * self.model.low_channels * tokens * self.model.low_fusion_blocks

    def recommend(
        self,
        global_batch: int,
        world_size: int,
        zero: ZeroSettings,
        budget_gib: float,
        device: str = "gpu",
        checkpoints: tuple[str, ...] = tuple(CHECKPOINT_LADDER),
        micro_batches: tuple[int, ...] | None = None,
    ) -> Prediction | None:
        """The least recompute, then the fewest accumulation steps, that fit `budget_gib` per rank; None
        if nothing does. `checkpoints` (names, least recompute first) and `micro_batches` restrict the
        choice (e.g. to a setting the user fixed). The micro-batch is a rank's largest (an uneven split's
        larger share). Raises BatchSplitError when there are more ranks than images."""
        split_global_batch(global_batch, world_size)
        micros = micro_batch_candidates(global_batch, world_size)
        micros = [m for m in micros if micro_batches is None or m in micro_batches]
        for checkpoint in checkpoints:
            for micro in micros:
                accumulation = split_global_batch(global_batch, world_size, micro).accumulation
                prediction = self.predict(Setting(micro, accumulation, checkpoint), world_size, zero, device)
                if prediction.fits(budget_gib):
                    return prediction
        return None


def _zero_name(zero: ZeroSettings) -> str:
    if zero.stage == 0:
        return "ddp"
    return f"zero{zero.stage}" + ("+offload" if zero.offload_optimizer else "")
