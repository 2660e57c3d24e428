"""A configuration's step memory as a line in the micro-batch, from two traces, cached on disk.

The tensor memory of a training step is affine in the images per process: a fixed part (weights, the
EMA copy, gradients and optimizer state, which do not depend on the batch) plus a part per image
(activations and their gradients). `step_memory` traces the step at `FIT_BATCHES` images and draws the
line through the two peaks; tests check that the line predicts other micro-batches. One image per
process is not traced: train-mode BatchNorm refuses a single value per channel (the efficient
variant's pooled attention).

A bf16 step planned for a GPU is traced with CUDA autocast's choice of dtypes (`policy="cuda"`,
`adyolo.plan.cuda_autocast`), one for a CPU with CPU autocast's; in fp32 the two are the same trace.

Traces are cached per configuration in a JSON file (`default_cache_dir()`, or the caller's folder), keyed
by everything that changes a step's memory (the model, loss and optimizer sections, the precision and
autocast policy, torch's version and adyolo's), so a repeated plan takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import adyolo
from adyolo.engine.config import OptimConfig, TrainConfig
from adyolo.loss.config import LossConfig
from adyolo.model import ModelConfig
from adyolo.plan.trace import StepTrace, trace_steps
from adyolo.schema import to_dict

FIT_BATCHES = (2, 4)


@dataclass(frozen=True)
class Line:
    """bytes = fixed + per_image x micro-batch."""

    fixed: float
    per_image: float

    def __call__(self, micro_batch: int) -> float:
        return self.fixed + self.per_image * micro_batch

    @classmethod
    def through(cls, points: list[tuple[int, float]]) -> Line:
        (x0, y0), (x1, y1) = points
        slope = (y1 - y0) / (x1 - x0)
        return cls(y0 - slope * x0, slope)


@dataclass(frozen=True)
class StepMemory:
    """Tensor memory of one training step in one process: the larger of the backward phase's peak and
    the optimizer step's, each a line in the micro-batch."""

    backward: Line
    optimizer_step: Line
    parameters: int  # bytes of the model's weights (one copy)
    optimizer_state: int  # bytes of the optimizer's state
    traces: tuple[StepTrace, ...]

    def peak(self, micro_batch: int) -> float:
        return max(self.backward(micro_batch), self.optimizer_step(micro_batch))


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adyolo" / "plan"


def step_memory(
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    optim: OptimConfig,
    train: TrainConfig,
    precision: str,
    cache_dir: Path | None = None,
    policy: str = "cpu",
) -> StepMemory:
    """The step memory line of this configuration (traced, or read from the cache); `policy`: whose
    autocast policy a bf16 step follows, "cpu" or "cuda"."""
    policy = autocast_policy(precision, policy)
    key = cache_key(model_cfg, loss_cfg, optim, train, precision, policy)
    cache = (cache_dir or default_cache_dir()) / f"{key}.json"
    if cache.is_file():
        traces = tuple(StepTrace.from_dict(t) for t in json.loads(cache.read_text())["traces"])
    else:
        traces = tuple(trace_steps(model_cfg, loss_cfg, optim, train, FIT_BATCHES, precision, policy=policy))
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"traces": [t.as_dict() for t in traces]}))
        os.replace(tmp, cache)
    small = traces[0]
    return StepMemory(
        backward=Line.through([(t.micro_batch, t.backward_peak) for t in traces]),
        optimizer_step=Line.through([(t.micro_batch, t.step_peak) for t in traces]),
        parameters=small.parameters,
        optimizer_state=small.optimizer_state,
        traces=traces,
    )


def autocast_policy(precision: str, policy: str) -> str:
    """The policy that matters: without autocast (fp32) both devices trace the same step."""
    return policy if precision == "bf16" else "cpu"


def cache_key(
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    optim: OptimConfig,
    train: TrainConfig,
    precision: str,
    policy: str = "cpu",
):
    """A hash of what a step's memory depends on: the model section (checkpointed blocks included), the
    loss, the optimizer's kind (its state), the precision and autocast policy, and the code and versions
    that run the step. The train section's settings change no tensor of the traced step (see `trace_step`)."""
    what = {
        "model": to_dict(model_cfg),
        "loss": to_dict(loss_cfg),
        "optimizer": optim.optimizer,
        "precision": precision,
        "policy": autocast_policy(precision, policy),
        "fit_batches": FIT_BATCHES,
        "torch": torch.__version__,
        "adyolo": adyolo.__version__,
        "trace": _source_digest(),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _source_digest() -> str:
    """The model, loss, step and trace code: a change to any of them can change a step's memory."""
    root = Path(adyolo.__file__).parent
    digest = hashlib.sha256()
    for path in sorted([*root.glob("model/*.py"), *root.glob("loss/*.py"), root / "engine" / "step.py"]):
        digest.update(path.read_bytes())
    for name in ("trace.py", "cuda_autocast.py"):
        digest.update((root / "plan" / name).read_bytes())
    return digest.hexdigest()[:16]
