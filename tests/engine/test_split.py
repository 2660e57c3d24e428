"""The same global batch trains the same step however it is split: over micro-batches and accumulation,
over ranks (DDP, DeepSpeed ZeRO), evenly or not. The loss of each micro-batch is its part of the global
batch's loss (YOLOv5's: mean x images), so the step's gradient is G x the mean per-image gradient."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adyolo.data.batch import synthetic_batch
from adyolo.engine.setup import seeded_model
from adyolo.loss.config import LossConfig
from adyolo.loss.criterion import DetectionLoss, LossNorm
from adyolo.model import ModelConfig

from ..conftest import relative_error
from .runs import ACCELERATE, ROOT, environment

ONE_STEP = ROOT / "tests" / "engine" / "one_step.py"
# SGD (the paper recipe's optimizer, whose steps scale with the gradient) without warm-up: one step at lr 0.01.
RECIPE = [
    "model.size=n",
    "model.img_size=64",
    "model.drop_path=0",  # stochastic depth draws per micro-batch: no two splits would drop alike
    "train.global_batch=40",
    "train.precision=fp32",
    "optim.optimizer=sgd",
    "optim.lr=0.01",
    "optim.warmup_epochs=0",
    "optim.warmup_min_steps=0",
]


def test_micro_batch_losses_add_up_to_the_whole_batch():
    """With the global batch's counts, the parts of distinct images add up to the loss of all of them in
    one piece, and so do the gradients with respect to the head's outputs: exact, not on average."""
    torch.manual_seed(0)
    model = seeded_model(ModelConfig(size="n", img_size=64), 0)
    loss_fn = DetectionLoss(LossConfig(), model.head.anchors, model.head.strides, 1)
    batch = synthetic_batch(5, 64, seed=3)
    raw = [torch.randn(5, 3, 64 // s, 64 // s, 16, requires_grad=True) for s in loss_fn.level_strides]
    whole = loss_fn(raw, batch["targets"])
    whole["total"].backward()
    reference = [r.grad.clone() for r in raw]
    for r in raw:
        r.grad = None

    parts = [(0, 2), (2, 3), (3, 5)]  # micro-batches of 2, 1 and 2 images
    per_part = []
    for lo, hi in parts:
        rows = batch["targets"][(batch["targets"][:, 0] >= lo) & (batch["targets"][:, 0] < hi)].clone()
        rows[:, 0] -= lo
        per_part.append(rows)
    counts = sum(loss_fn.counts(loss_fn.assign(t, (64, 64))) for t in per_part)
    norm = LossNorm(5, counts)
    total = {k: 0.0 for k in whole}
    for (lo, hi), rows in zip(parts, per_part):
        part = loss_fn([r[lo:hi] for r in raw], rows, norm=norm)
        part["total"].backward()
        total = {k: total[k] + part[k] for k in whole}
    for key in whole:
        assert float(total[key]) == pytest.approx(float(whole[key]), rel=1e-5), key
    for r, ref in zip(raw, reference):
        assert relative_error(r.grad, ref) < 1e-5


def one_step(out: Path, name: str, overrides: list[str], launcher: str | None = None, processes: int = 1) -> dict:
    target = out / f"{name}.pt"
    spec = json.dumps({"overrides": [*RECIPE, *overrides]})
    if launcher is None:
        command = [sys.executable, str(ONE_STEP), spec, str(target)]
    else:
        config = ROOT / "ds_configs" / f"accelerate_{launcher}.yaml"
        command = [
            str(ACCELERATE), "launch", "--config_file", str(config), "--num_processes", str(processes),
            "--main_process_port", "0", str(ONE_STEP), spec, str(target),
        ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment(), cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(target, weights_only=False)


def step_taken(run: dict) -> list[torch.Tensor]:
    """What the step changed: the parameters after it minus the (seeded, identical) ones before it."""
    before = dict(seeded_model(ModelConfig(size="n", img_size=64), 0).named_parameters())
    return [run["weights"][name] - before[name].detach() for name in before]


def same_step(run: dict, reference: dict) -> bool:
    """The two steps changed the weights alike. Rounding (BatchNorm's backward over 40 or 13 images
    cancels large sums) leaves about 1e-4; a step of the wrong size (the gradient scaled with the
    micro-batch instead of the global batch) is off by 50 % or more."""
    taken, wanted = (torch.cat([d.flatten() for d in step_taken(r)]) for r in (run, reference))
    return relative_error(taken, wanted) < 1e-3


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """40 copies of one image in one micro-batch of one process."""
    return one_step(tmp_path_factory.mktemp("reference"), "reference", [])


@pytest.mark.slow
def test_accumulation_takes_the_step_of_the_whole_batch(reference, tmp_path):
    run = one_step(tmp_path, "accumulated", ["train.micro_batch=16"])
    assert run["split"] == "global batch 40 = 1 rank x 40 images (micro-batch 14 / 13, 3 accumulation steps)"
    assert same_step(run, reference)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    ("launcher", "processes", "overrides", "split"),
    [
        # 2 ranks, uneven accumulation: 7 + 7 + 6 images per rank.
        ("ddp", 2, ["train.micro_batch=7"], "2 ranks x 20 images (micro-batch 7 / 6, 3 accumulation steps)"),
        # 3 ranks, uneven: 14 + 13 + 13, under ZeRO-2 with the optimizer offloaded to host memory, which
        # must stay the configured SGD.
        ("zero2_offload", 3, [], "1 rank x 14 + 2 ranks x 13 images (micro-batch 14 / 13, 1 accumulation step)"),
    ],
)  # fmt: skip
def test_ranks_take_the_step_of_one_process(reference, tmp_path, launcher, processes, overrides, split):
    run = one_step(tmp_path, launcher, overrides, launcher=launcher, processes=processes)
    assert run["split"] == f"global batch 40 = {split}" and run["stepped"] and run["optimizer"] == "SGD"
    assert same_step(run, reference)
    # The logged loss is the global batch's, not one rank's share.
    assert run["loss"]["total"] == pytest.approx(reference["loss"]["total"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_ema_averages_the_fp32_weights(tmp_path):
    """Under ZeRO-3 with bf16 autocast DeepSpeed gathers Conv weights in bf16 for a forward; the EMA (and
    best.pt / last.pt) must average the fp32 weights. With a long EMA ramp the first update is almost a
    copy, so the EMA equals the fp32 weights (and not their bf16 rounding, off by up to 2^-9)."""
    run = one_step(tmp_path, "zero3", ["train.precision=bf16", "train.ema_ramp=1e9"], launcher="zero3", processes=2)
    assert run["stepped"] and run["ema_decay"] < 1e-6
    assert run["lowered"]  # the forward gathers these Conv weights in bf16
    conv = [name for name, value in run["fp32_live"].items() if value.dim() == 4]
    assert conv
    for name in conv:
        assert relative_error(run["ema"][name], run["fp32_live"][name]) < 1e-5, name
