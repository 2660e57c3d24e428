"""The CPU trace of a GPU step follows CUDA autocast's policy (`adyolo.plan.cuda_autocast`), checked
against CUDA's policy itself: fake tensors on the CUDA device with CUDA autocast switched on apply it
without a GPU (forward only: backward needs a CUDA context)."""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from adyolo.config import RunConfig
from adyolo.loss.config import LossConfig
from adyolo.model import ModelConfig
from adyolo.plan.cuda_autocast import (
    CUDA_FP32,
    CUDA_FP32_OUTPUT,
    CUDA_LOWER_PRECISION,
    CUDA_NORM_WITH_DTYPE,
    CUDA_PROMOTE,
    cuda_autocast_policy,
    registered,
)
from adyolo.plan.trace import bf16_autocast, fake_cuda_available, trace_forward, trace_step
from adyolo.plan.validate import CUDA_POLICY, check_cuda_policy

needs_fake_cuda = pytest.mark.skipif(not fake_cuda_available(), reason="fake CUDA tensors need a CUDA build of torch")


def test_every_rule_cuda_autocast_has_is_accounted_for():
    """A CUDA rule is in a table or the same as CPU's (both register the operator): a torch that adds
    a rule fails here until the rule is classified. And every table entry is a CUDA rule."""
    tables = {*CUDA_FP32, *CUDA_FP32_OUTPUT, *CUDA_NORM_WITH_DTYPE, *CUDA_LOWER_PRECISION, *CUDA_PROMOTE}
    cuda, cpu = registered("AutocastCUDA"), registered("AutocastCPU")
    assert cuda - tables - cpu == set()
    assert tables - cuda == set()
    with cuda_autocast_policy() as installed:
        assert "softmax.int" in installed and "upsample_bilinear2d" in installed and "cat" in installed
    # CPU autocast's own rules are back: softmax and upsampling in bf16, cat copying to a common dtype.
    x = torch.ones(1, 2, 4, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert x.softmax(-1).dtype == F.interpolate(x, scale_factor=2.0).dtype == torch.bfloat16


class _Casts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.copies += func is torch.ops.aten._to_copy.default
        return func(*args, **(kwargs or {}))


# Operators by what CUDA's policy does with them, and a few it leaves alone.
SAMPLES = {
    "cat (CPU: promote, CUDA: none)": lambda a, b: torch.cat([a, b]),
    "stack (CPU: promote, CUDA: none)": lambda a, b: torch.stack([a, b]),
    "index_copy": lambda a, b: b.index_copy(0, torch.arange(2, device=b.device), a[:2]),
    "softmax": lambda a, b: a.softmax(-1),
    "log_softmax": lambda a, b: a.log_softmax(-1),
    "upsample nearest": lambda a, b: F.interpolate(a[None, None], scale_factor=2.0),
    "upsample bilinear": lambda a, b: F.interpolate(a[None, None], scale_factor=2.0, mode="bilinear"),
    "layer_norm": lambda a, b: F.layer_norm(a, (4,)),
    "group_norm": lambda a, b: F.group_norm(a[None], 2),
    "exp": lambda a, b: a.exp(),
    "pow": lambda a, b: a.pow(2),
    "sum": lambda a, b: a.sum(),
    "sum dim": lambda a, b: a.sum(0),
    "cumsum": lambda a, b: a.cumsum(0),
    "prod (CPU: fp32 copy, CUDA: fp32 output)": lambda a, b: a.prod(),
    "norm": lambda a, b: a.norm(),
    "norm dim": lambda a, b: a.norm(2, 0),
    "vector_norm": lambda a, b: torch.linalg.vector_norm(a),
    "addcmul (promote)": lambda a, b: torch.addcmul(b, a, b),
    "atan2 (promote)": lambda a, b: torch.atan2(a, b),
    "mv (lower)": lambda a, b: torch.mv(b, b[0]),
    "einsum (lower)": lambda a, b: torch.einsum("ij,jk->ik", b, b),
    "mm (both lower)": lambda a, b: a @ b,
    "addmm (both lower)": lambda a, b: torch.addmm(b, a, b),
    "mse_loss (both fp32)": lambda a, b: F.mse_loss(a, a),
    "mean (none)": lambda a, b: a.mean(),
    "sigmoid (none)": lambda a, b: a.sigmoid(),
    "max_pool (none)": lambda a, b: F.max_pool2d(a[None], 2),
}


def _dtypes_and_copies(device: str, policy: str) -> dict[str, tuple[torch.dtype, int]]:
    """Each sample's output dtype and number of copies under bf16 autocast, on fake `device` tensors."""
    results = {}
    with FakeTensorMode(), cuda_autocast_policy() if policy == "cuda" else contextlib.nullcontext():
        a = torch.randn(4, 4, device=device, dtype=torch.bfloat16)
        b = torch.randn(4, 4, device=device)
        for name, sample in SAMPLES.items():
            casts = _Casts()
            with bf16_autocast(device), casts:
                out = sample(a, b)
            results[name] = (out.dtype, casts.copies)
    return results


@needs_fake_cuda
def test_each_operator_takes_cudas_dtype_and_copies():
    cuda = _dtypes_and_copies("cuda", "cuda")
    emulated = _dtypes_and_copies("cpu", "cuda")
    assert emulated == cuda
    assert cuda["softmax"][0] == cuda["upsample bilinear"][0] == cuda["layer_norm"][0] == torch.float32
    # CPU autocast's own policy differs on these (the test would catch a policy that did nothing).
    plain = _dtypes_and_copies("cpu", "cpu")
    differ = {name for name in SAMPLES if plain[name] != cuda[name]}
    assert {"softmax", "upsample bilinear", "layer_norm", "cat (CPU: promote, CUDA: none)"} <= differ


def _normalised(ops: collections.Counter) -> collections.Counter:
    """Operator calls by output dtypes, less what differs by device implementation, not by policy:
    which SDPA kernel runs, the dtype fake CPU BatchNorm gives its saved statistics, device queries."""
    out = collections.Counter()
    for (name, dtypes), calls in ops.items():
        if name == "prim.device":
            continue
        if "scaled_dot_product" in name:
            name, dtypes = "sdpa", dtypes[:1]
        if name == "aten.native_batch_norm":
            dtypes = dtypes[:1]
        out[(name, dtypes)] += calls
    return out


@needs_fake_cuda
@pytest.mark.parametrize("variant", CUDA_POLICY, ids=lambda v: "-".join(v))
def test_the_emulated_forward_of_each_variant_is_cudas(variant):
    """Model forward and loss: the same operators in the same dtypes as on fake CUDA tensors under
    CUDA's autocast, and the same activation memory (within the BatchNorm statistics' dtype)."""
    fusion, attention, neck = variant
    model = ModelConfig(size="n", fusion=fusion, attention=attention, neck=neck, img_size=96, drop_path=0.0)
    cuda = trace_forward(model, LossConfig(), 2, device="cuda", policy="cuda")
    emulated = trace_forward(model, LossConfig(), 2, device="cpu", policy="cuda")
    assert _normalised(emulated.ops) == _normalised(cuda.ops)
    assert emulated.saved_bytes == pytest.approx(cuda.saved_bytes, rel=0.01)
    if attention == "explicit":  # CPU's policy keeps the softmax in bf16: far less saved
        plain = trace_forward(model, LossConfig(), 2, device="cpu", policy="cpu")
        assert plain.saved_bytes < 0.95 * cuda.saved_bytes


@needs_fake_cuda
def test_the_validation_row_compares_the_two_forwards():
    row = check_cuda_policy("efficient", "sdpa", "yolov5face", size="n", img=128, micro_batch=2)
    assert row["configuration"].startswith("forward, CUDA autocast: yolov5face n 128px")
    assert abs(row["error"]) < 0.01 and row["measured_bytes"] > 0


def test_a_fake_trace_under_cudas_policy_counts_what_a_real_step_allocates():
    """The whole step (backward included, which only the CPU can run): fake and real tensors under the
    emulated policy agree (up to the dtype of BatchNorm's saved statistics on fake tensors), and the
    policy adds the fp32 softmax CPU autocast would not keep."""
    cfg = RunConfig(model=ModelConfig(size="n", fusion="full", attention="explicit", img_size=96))
    args = (cfg.model, cfg.loss, cfg.optim, cfg.train, 2, "bf16")
    fake = trace_step(*args, policy="cuda")
    real = trace_step(*args, fake=False, policy="cuda")
    assert fake.backward_peak == pytest.approx(real.backward_peak, rel=0.002)
    assert fake.step_peak == real.step_peak and fake.optimizer_state == real.optimizer_state
    assert fake.backward_peak > trace_step(*args, policy="cpu").backward_peak * 1.015
    with pytest.raises(ValueError, match="policy 'tpu'"):
        trace_step(*args, policy="tpu")
