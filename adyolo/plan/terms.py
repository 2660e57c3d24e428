"""What a trace of one bare training step cannot see, each a named term in bytes.

A trace (`adyolo.plan.trace`) counts the tensors of one process training the whole model alone. A
rank of a real run differs by:

Data-parallel state, per rank, against the traced single process (P: bytes of the weights, S: of the
optimizer state, W: ranks; the coefficients measured on the CPU with torch's DDP and DeepSpeed 0.19.8,
sizes n and s, 2 and 4 ranks, within 2 % of the measured peaks; `tests/plan` checks them):
- DDP (`ddp_buckets`): + P. The reducer copies every gradient into its buckets (accelerate's default,
  `gradient_as_bucket_view=False`).
- ZeRO-1 and ZeRO-2: - S (1 - 1/W) (each rank keeps the optimizer state of its share of the weights)
  + P/W (an fp32 copy of that share, cloned even when the weights already are fp32) + 1.5 P (the
  gradients' flattened copies while they are reduced) + 2 x `reduce_bucket_size` fp32 elements (the
  reduction buckets). The buckets are as large as the JSON says whatever the model's size: 381 MiB with
  ds_configs/, more than size s's whole model state.
- ZeRO-3: - S (1 - 1/W) + 3 P/W + P/6 (the shares of weights, gradients and their fp32 copy, and the
  small weights every rank keeps whole) + `reduce_bucket_size`/2 and `stage3_prefetch_bucket_size` fp32
  elements (reduction and prefetch buckets). The weights are gathered for forward and backward, so the
  peak does not shrink by their share.
- CPU offload (`2_offload`): the optimizer state and the fp32 share live in host memory instead.
DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs`) assume 16-bit weights with fp32
masters, which is not how adyolo trains (fp32 weights, bf16 autocast), so they are not used.

GPU only (`GpuAssumptions`; not measurable here, each a stated default that `launch/plan.py` can change):
- autocast: a bf16 step planned for a GPU is traced with CUDA autocast's choice of dtypes
  (`adyolo.plan.cuda_autocast`), which is checked against CUDA's own policy; not a term here.
- the fused attention kernel: the CPU trace takes SDPA's flash kernel for CPU; on an H200 the same
  attention (B=40, 8 heads, N=6400, d=32, forward + backward) measured 1.24 GiB with the flash kernel and
  0.995 GiB with cuDNN in bf16, 1.97 GiB with the memory-efficient kernel in fp32, against 0.977 and
  1.953 GiB traced on the CPU: the default assumes the flash kernel's +27 % (bf16) and +1 % (fp32)
  over the traced attention tensors.
- cuDNN / cuBLAS workspaces: allocated through PyTorch's caching allocator, so inside
  `torch.cuda.max_memory_allocated` (cuBLAS keeps one per stream; cuDNN's convolutions take one per
  call): a fixed GiB per rank added to the allocated peak.
- allocator: the caching allocator reserves more than it hands out (block rounding, fragmentation);
  the reserve factor multiplies the allocated peak. It follows the allocator setting a training run
  uses (`adyolo.engine.cuda_allocator`): smaller with `expandable_segments:True`, which training sets
  unless the user chose another `PYTORCH_CUDA_ALLOC_CONF`.
- the CUDA context and loaded kernels, and NCCL's buffers, sit outside PyTorch's allocator: fixed GiB
  per rank (NCCL only with more than one rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from adyolo.engine.cuda_allocator import allocator_setting

GIB = 2**30
FP32_BYTES = 4
# The low-resolution attention's tensors per element of q in a traced forward + backward (q, k, v, the
# output and their gradients): 32 bytes in fp32, 16 in bf16 (traced: 1.953 GiB and 0.977 GiB for
# 40 x 8 x 6400 x 32 elements of q).
ATTENTION_BYTES_PER_Q_ELEMENT = {"fp32": 32.0, "bf16": 16.0}


@dataclass(frozen=True)
class ZeroSettings:
    """What of a DeepSpeed JSON changes memory (`adyolo.engine.accelerator.read_deepspeed_config`)."""

    stage: int  # 0: no DeepSpeed (DDP when world_size > 1)
    offload_optimizer: bool = False
    reduce_bucket_size: int = 50_000_000  # elements
    prefetch_bucket_size: int = 50_000_000  # elements (stage 3)


def expandable_segments_in_effect() -> bool:
    """Whether a training run started from this environment uses expandable segments."""
    return allocator_setting().expandable_segments


@dataclass(frozen=True)
class GpuAssumptions:
    """GPU memory a CPU trace cannot see (see the module docstring); GiB per rank unless a factor."""

    attention_kernel_excess: float = 0.27  # the flash kernel over the traced attention tensors, bf16
    attention_kernel_excess_fp32: float = 0.01  # memory-efficient kernel over the traced ones, fp32
    workspace_gib: float = 0.25  # cuDNN / cuBLAS workspaces, inside the caching allocator
    reserved_factor: float = 1.10  # caching allocator, default settings: reserved / allocated at the peak
    reserved_factor_expandable: float = 1.05  # ... with expandable_segments:True
    expandable_segments: bool = field(default_factory=expandable_segments_in_effect)
    cuda_context_gib: float = 0.6  # CUDA context, loaded kernels (NVML sees them, PyTorch does not)
    nccl_gib: float = 0.25  # NCCL communicator buffers, with more than one rank

    @property
    def reserve(self) -> float:
        """reserved / allocated at the peak under the allocator setting in effect."""
        return self.reserved_factor_expandable if self.expandable_segments else self.reserved_factor


def data_parallel_bytes(zero: ZeroSettings, world_size: int, parameters: int, optimizer_state: int) -> dict[str, float]:
    """Bytes a rank holds beyond (or, negative, short of) the traced single-process step, as named
    terms (see the module docstring). `parameters`: bytes of the model's weights (P); `optimizer_state`:
    bytes of the optimizer's state for all of them (S)."""
    if world_size == 1 and zero.stage == 0:
        return {}
    if zero.stage == 0:
        return {"ddp_buckets": float(parameters)}
    share = 1 / world_size
    terms: dict[str, float] = {}
    if zero.offload_optimizer:
        terms["optimizer_state_offloaded"] = -float(optimizer_state)
    else:
        terms["optimizer_state_sharded"] = -optimizer_state * (1 - share)
    if zero.stage in (1, 2):
        if not zero.offload_optimizer:
            terms["fp32_share"] = parameters * share
        terms["gradient_copies"] = 1.5 * parameters
        terms["reduce_buckets"] = 2.0 * zero.reduce_bucket_size * FP32_BYTES
    else:
        terms["shares"] = 3 * parameters * share + parameters / 6
        terms["reduce_bucket"] = zero.reduce_bucket_size / 2 * FP32_BYTES
        terms["prefetch_bucket"] = float(zero.prefetch_bucket_size * FP32_BYTES)
    return terms


def untouched_bucket_bytes(zero: ZeroSettings, parameters: int) -> float:
    """Bytes of DeepSpeed's buckets that are allocated but never written (`torch.empty` of the JSON's
    size, filled only up to the gradients): on a CPU they take no resident memory, so the process's RSS
    does not hold them (on a GPU allocated memory counts whether written or not)."""
    sizes = {1: [zero.reduce_bucket_size] * 2, 2: [zero.reduce_bucket_size] * 2}.get(
        zero.stage, [zero.reduce_bucket_size / 2, zero.prefetch_bucket_size] if zero.stage == 3 else []
    )
    return sum(max(0.0, elements * FP32_BYTES - parameters) for elements in sizes)


def attention_kernel_bytes(q_elements: int, precision: str, gpu: GpuAssumptions) -> float:
    """The GPU attention kernel's bytes beyond the traced (CPU flash) attention, for `q_elements`
    elements of q over all the model's SDPA attentions of one micro-batch."""
    excess = gpu.attention_kernel_excess if precision == "bf16" else gpu.attention_kernel_excess_fp32
    return excess * ATTENTION_BYTES_PER_Q_ELEMENT[precision] * q_elements


def workspace_bytes(gpu: GpuAssumptions) -> float:
    """cuDNN / cuBLAS workspaces: allocated through the caching allocator, so part of the allocated peak."""
    return gpu.workspace_gib * GIB


def gpu_fixed_bytes(world_size: int, gpu: GpuAssumptions) -> dict[str, float]:
    """Per-rank device memory outside PyTorch's allocator."""
    terms = {"cuda_context": gpu.cuda_context_gib * GIB}
    if world_size > 1:
        terms["nccl"] = gpu.nccl_gib * GIB
    return terms
