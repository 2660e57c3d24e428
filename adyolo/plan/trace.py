"""One real training step traced on fake tensors: the tensor memory it needs, without allocating it.

`trace_step` builds the detector, its loss, optimizer and EMA exactly as training does (`bare_step`)
inside `FakeTensorMode` on the CPU device, and runs one `TrainStep` window (forward, loss, backward,
clipping, optimizer step, EMA update) on a synthetic batch while PyTorch's `MemTracker` counts every
live tensor storage: parameters, buffers, gradients, activations, backward temporaries and optimizer
state. Nothing is computed and no tensor memory is allocated. On the CPU device the fake step takes the
same kernels' shapes as a real CPU step (SDPA's flash kernel for CPU included), so the count is the
tensor memory of a real CPU step; `adyolo.plan.terms` turns it into a GPU prediction. A bf16 step
traced for a GPU (`policy="cuda"`) follows CUDA autocast's choice of dtypes
(`adyolo.plan.cuda_autocast`), which `trace_forward` checks against CUDA's own policy on fake CUDA
tensors.

Fake tensors have shapes but no values. Where the step reads values, `AssumeTheTrainingPath` answers
for them: every `nonzero` finds every element (the training step has none since the loss keeps every
candidate with a mask; a model or loss with one is overstated there, not understated), and every read on the host
(`.item()`, `bool(tensor)`) gives 1, so the loss and the gradient norm are finite and the step takes the
path that trains.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from adyolo.data.batch import synthetic_batch
from adyolo.engine.config import OptimConfig, TrainConfig
from adyolo.engine.setup import bare_step
from adyolo.loss.config import LossConfig
from adyolo.loss.criterion import DetectionLoss
from adyolo.model import ModelConfig, build_model
from adyolo.plan.cuda_autocast import cuda_autocast_policy

# MemTracker's categories, as the trace reports them.
CATEGORIES = {
    "Parameter": "parameters",
    "Buffer": "buffers",
    "Gradient": "gradients",
    "Activation": "activations",
    "Temp": "temporaries",
    "Optstate": "optimizer_state",
    "Other": "other",
}
_TOTAL = "Total"  # MemTracker's key for the sum of all categories
_ASSUMED_SCALAR = 1  # what a host read of a fake value answers (see the module docstring)
_HOST_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)
_MASK_INDEXING = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default)
POLICIES = ("cpu", "cuda")  # whose autocast policy a bf16 step follows


@dataclass(frozen=True)
class StepTrace:
    """Tensor memory of one training step at `micro_batch` images, in bytes.

    A step has two phases whose peaks scale differently with the batch: forward and backward
    (activations, up to the gradient clipping) and the optimizer step with the EMA update."""

    micro_batch: int
    backward_peak: int  # the most tensor memory alive during forward and backward
    step_peak: int  # ... during the optimizer step and the EMA update
    at_peak: dict[str, int]  # the larger peak by category (CATEGORIES' values)
    parameters: int  # bytes of the model's weights (one copy: the EMA holds another)
    optimizer_state: int  # bytes of the optimizer's state after the step

    @property
    def peak_bytes(self) -> int:
        return max(self.backward_peak, self.step_peak)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StepTrace:
        return cls(**data)


class AssumeTheTrainingPath(TorchDispatchMode):
    """Answers, on fake tensors, what only values could decide (see the module docstring)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.nonzero.default:
            return _all_indices(args[0])
        if func in _MASK_INDEXING and any(i is not None and i.dtype == torch.bool for i in args[1]):
            # x[mask] and x[mask] = v: the mask selects every element
            return func(args[0], _without_masks(args[1]), *args[2:], **kwargs)
        if func in _HOST_READS:
            try:
                return func(*args, **kwargs)
            except DataDependentOutputException:
                return True if func is torch.ops.aten.is_nonzero.default else _ASSUMED_SCALAR
        return func(*args, **kwargs)


class PeakMemTracker(MemTracker):
    """`MemTracker` keeping only the whole-step peak and its split by category. Its per-module
    statistics walk every module seen so far on every op and copy a snapshot at every module call
    (17 s of an 18 s trace of size n); the plan needs only the step's total. Falls back to the full
    bookkeeping if a torch version lacks the fields this relies on."""

    def _update_peak_stats(self, peak_state) -> None:
        if not all(hasattr(self, name) for name in ("_curr_mem_snap", "_peak_mem", "_peak_mem_snap")):
            return super()._update_peak_stats(peak_state)
        for device, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snap[_TOTAL]:
                self._peak_mem[device] = snap[_TOTAL]
                self._peak_mem_snap[device] = dict(snap)

    # MemTracker's module hooks record a snapshot per module call (the per-module statistics) and flag
    # activation checkpointing's recompute in backward; only the flag matters for the step's peak.
    def _pre_fw_hook(self, module, inputs) -> None:
        if self._mod_tracker.is_bw and self._ac_mod is None:
            self._ac_mod = weakref.ref(module)
            self._in_ac = True

    def _post_fw_hook(self, module, inputs, outputs) -> None:
        if self._mod_tracker.is_bw and self._ac_mod is not None and self._ac_mod() is module:
            self._ac_mod = None
            self._in_ac = False

    def _pre_bw_hook(self, module, args) -> None:
        pass

    def _post_bw_hook(self, module, args) -> None:
        pass

    def reset_peak(self) -> None:
        """From now on the peak starts at what is alive now (also the per-module statistics, which
        MemTracker would otherwise refuse to extend over a second iteration)."""
        self.reset_mod_stats()
        self._peak_mem_snap = self.get_tracker_snapshot("current")
        self._peak_mem = {device: snap[_TOTAL] for device, snap in self._peak_mem_snap.items()}

    def peak_snapshot(self) -> dict[str, int]:
        """The peak's bytes by MemTracker category (and "Total"), over all devices."""
        summed: dict[str, int] = {}
        for snap in self.get_tracker_snapshot("peak").values():
            for key, value in snap.items():
                summed[key] = summed.get(key, 0) + int(value)
        return summed

    @contextlib.contextmanager
    def phases(self) -> Iterator[list[dict[str, int]]]:
        """Within: the peak snapshots of each phase, a phase ending where an optimizer's step begins.
        The list gets the backward phase's peak at the step (any optimizer's, e.g. the one inside a
        DeepSpeed engine) and the last phase's at the end."""
        peaks: list[dict[str, int]] = []

        def step_begins(optimizer, args, kwargs) -> None:
            peaks.append(self.peak_snapshot())
            self.reset_peak()

        self.reset_peak()
        handle = register_optimizer_step_pre_hook(step_begins)
        try:
            yield peaks
        finally:
            handle.remove()
        peaks.append(self.peak_snapshot())


def categories(snapshot: dict[str, int]) -> dict[str, int]:
    """A MemTracker snapshot by this module's category names."""
    return {name: int(snapshot.get(key, 0)) for key, name in CATEGORIES.items()}


def _without_masks(indices: list) -> list:
    """Advanced indices with each boolean mask replaced by the long indices of all its elements."""
    out = []
    for index in indices:
        if index is not None and index.dtype == torch.bool:
            out.extend(_all_indices(index).unbind(1))
        else:
            out.append(index)
    return out


def _all_indices(tensor: torch.Tensor) -> torch.Tensor:
    """What `nonzero` returns when every element is non-zero: [numel, ndim] int64 indices."""
    grids = torch.meshgrid(*(torch.arange(size, device=tensor.device) for size in tensor.shape), indexing="ij")
    return torch.stack(grids, dim=-1).reshape(-1, tensor.dim())


def trace_step(
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    optim: OptimConfig,
    train: TrainConfig,
    micro_batch: int,
    precision: str = "fp32",
    fake: bool = True,
    policy: str = "cpu",
) -> StepTrace:
    """The tensor memory of one training step of this configuration at `micro_batch` images per
    process (`precision` "bf16": the forward under CPU autocast, with CUDA autocast's choice of dtypes
    for `policy="cuda"`). `fake=False` runs the same step on real tensors: the measurement a trace is
    checked against."""
    return trace_steps(model_cfg, loss_cfg, optim, train, (micro_batch,), precision, fake, policy)[0]


def trace_steps(
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    optim: OptimConfig,
    train: TrainConfig,
    micro_batches: Sequence[int],
    precision: str = "fp32",
    fake: bool = True,
    policy: str = "cpu",
) -> list[StepTrace]:
    """`trace_step` at each of `micro_batches`, one model built for all: each counted step is a steady
    step of the same run, the optimizer's state and the EMA already there."""
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r}: one of {', '.join(POLICIES)}")
    dtype = torch.bfloat16 if precision == "bf16" else None
    # channels_last changes strides, not bytes; compiling would trace something else than the step.
    train = dataclasses.replace(train, channels_last=False, compile=False)
    traces = []
    with contextlib.ExitStack() as stack:
        if policy == "cuda" and dtype is not None:
            stack.enter_context(cuda_autocast_policy())
        if fake:
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            stack.enter_context(AssumeTheTrainingPath())
        step = bare_step(model_cfg, loss_cfg, optim, train, torch.device("cpu"), dtype)
        if fake:
            # A first step on zero gradients leaves what a first training step leaves (a whole
            # forward and backward on fake tensors would double the trace's time for nothing it keeps).
            _first_optimizer_step(step)
        else:
            step.run_window(itertools.repeat(synthetic_batch(micro_batches[0], model_cfg.img_size)), step=0)
        for micro_batch in micro_batches:
            batch = synthetic_batch(micro_batch, model_cfg.img_size)
            # What lives between steps is registered with a fresh tracker; the step's own tensors it sees.
            tracker = PeakMemTracker()
            tracker.track_external(step.model, step.optimizer, step.ema.module, batch["images"], batch["targets"])
            with tracker, tracker.phases() as peaks:
                step.run_window(itertools.repeat(batch), step=1)
            after = tracker.get_tracker_snapshot("current")
            backward, optimizer_step = peaks
            traces.append(
                StepTrace(
                    micro_batch=micro_batch,
                    backward_peak=backward[_TOTAL],
                    step_peak=optimizer_step[_TOTAL],
                    at_peak=categories(max(backward, optimizer_step, key=lambda snap: snap[_TOTAL])),
                    parameters=sum(p.numel() * p.element_size() for p in step.model.parameters()),
                    optimizer_state=sum(int(snap.get("Optstate", 0)) for snap in after.values()),
                )
            )
            del batch, tracker
    return traces


def _first_optimizer_step(step) -> None:
    """What a first training step leaves behind that later steps keep: the optimizer's state (from a
    step on zero gradients, which training then drops). The EMA's weights exist from the start."""
    params = [p for p in step.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    step.optimizer.step()
    step.optimizer.zero_grad(set_to_none=True)


@dataclass(frozen=True)
class ForwardTrace:
    """A forward and loss on fake tensors: what backward will need, and which dtypes the operators took."""

    saved_bytes: int  # tensor memory alive after forward and loss, beyond what was alive before
    ops: collections.Counter  # (operator, dtypes of its floating outputs) -> calls


class _RecordDtypes(TorchDispatchMode):
    """Counts each operator call by the dtypes of its floating-point outputs."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        dtypes = tuple(str(t.dtype) for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point())
        self.ops[(str(func.overloadpacket), dtypes)] += 1
        return out


class _FusedAttentionOnFakeCuda(TorchFunctionMode):
    """SDPA on fake CUDA tensors takes a fused kernel, as on a GPU. Its kernel choice asks the device
    and, without one, falls to the math path, which materialises the score matrix; the flash kernel
    (what a GPU takes for bf16 heads of 32) has a fake implementation."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and not kwargs and len(args) == 3:
            dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else args[0].dtype
            q, k, v = (t.to(dtype) for t in args)
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]
        return func(*args, **kwargs)


def fake_cuda_available() -> bool:
    """Whether this torch can make fake CUDA tensors (a CUDA build; no GPU needed)."""
    try:
        with FakeTensorMode():
            torch.empty(1, device="cuda")
    except (RuntimeError, AssertionError):
        return False
    return True


def trace_forward(
    model_cfg: ModelConfig, loss_cfg: LossConfig, micro_batch: int, device: str = "cpu", policy: str = "cpu"
) -> ForwardTrace:
    """One bf16 forward of a fresh model in training mode and its loss, on fake tensors of `device`
    ("cpu", or "cuda": CUDA autocast's own policy, which fake CUDA tensors apply without a GPU), CPU
    autocast following `policy` ("cpu", or "cuda": `cuda_autocast_policy`). Backward cannot run on fake
    CUDA tensors; this is how the CPU trace of a GPU step is checked against CUDA's policy."""
    with contextlib.ExitStack() as stack:
        if device == "cpu" and policy == "cuda":
            stack.enter_context(cuda_autocast_policy())
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        stack.enter_context(AssumeTheTrainingPath())
        with torch.device(device):
            model = build_model(model_cfg).train()
            loss = DetectionLoss(loss_cfg, model.head.anchors, model.head.strides, model_cfg.num_classes)
        batch = synthetic_batch(micro_batch, model_cfg.img_size, device)
        images = batch["images"].float().div_(255)
        tracker = PeakMemTracker()
        tracker.track_external(model, images, batch["targets"])
        recorder = _RecordDtypes()
        attention = _FusedAttentionOnFakeCuda() if device == "cuda" else contextlib.nullcontext()
        with tracker:
            before = _live_bytes(tracker)
            with bf16_autocast(device), recorder, attention:
                raw = model(images)
            with recorder:
                losses = loss(raw, batch["targets"])
            saved = _live_bytes(tracker) - before
        del raw, losses
    return ForwardTrace(saved, recorder.ops)


def _live_bytes(tracker: MemTracker) -> int:
    return sum(int(snap[_TOTAL]) for snap in tracker.get_tracker_snapshot("current").values())


@contextlib.contextmanager
def bf16_autocast(device: str) -> Iterator[None]:
    """bf16 autocast on `device`. `torch.autocast("cuda")` turns itself off where no GPU is present;
    switching CUDA autocast on directly applies its policy to fake CUDA tensors all the same."""
    if device != "cuda":
        with torch.autocast(device, dtype=torch.bfloat16):
            yield
        return
    enabled, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", dtype)
