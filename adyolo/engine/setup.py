"""The training objects around a built detector: its wrapping, loss, optimizer, Accelerate/DeepSpeed
preparation, EMA and the training step. One place, so that what `launch/train.py` trains is what
`launch/bench.py` times."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader

from adyolo.engine.accelerator import Launch
from adyolo.engine.config import OptimConfig, TrainConfig
from adyolo.engine.ema import ModelEMA, zero3_gather
from adyolo.engine.optim import Schedule, build_optimizer
from adyolo.engine.phases import PhaseTimes
from adyolo.engine.step import TrainStep
from adyolo.loss.config import LossConfig
from adyolo.loss.criterion import DetectionLoss
from adyolo.model import ModelConfig, build_model


def seeded_model(model_cfg: ModelConfig, seed: int) -> nn.Module:
    """The detector built from `seed`'s random streams (Python, NumPy, torch): identical on every rank."""
    set_seed(seed)
    return build_model(model_cfg)


def configure_model(model: nn.Module, train: TrainConfig, channels_last: bool) -> nn.Module:
    """SyncBatchNorm (on CUDA), the memory format and torch.compile as `train` asks (compile is in place:
    the state dict keys, the EMA and checkpoints stay as they are). `channels_last`: the resolved setting."""
    if train.sync_batchnorm and torch.cuda.is_available():
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if train.compile:
        model.compile()
    return model


@dataclass(frozen=True)
class TrainingConfigs:
    """The config sections the training objects are built from."""

    model: ModelConfig
    loss: LossConfig
    optim: OptimConfig
    train: TrainConfig


@dataclass
class PreparedTraining:
    step: TrainStep  # over the prepared model and optimizer, with the loss, schedule and EMA
    train_loader: DataLoader | None  # this rank's micro-batches
    val_loader: DataLoader | None  # prepared (sharded over the ranks)


def prepare_training(
    model: nn.Module,
    cfgs: TrainingConfigs,
    accelerator: Accelerator,
    launch: Launch,
    epochs: int,
    *,
    train_loader: DataLoader | None = None,
    val_loader: DataLoader | None = None,
    steps_per_epoch: int | None = None,
    phases: PhaseTimes | None = None,
) -> PreparedTraining:
    """Wrap `model` (freshly built from `cfgs.model`, identical on every rank), build its loss and
    optimizer, let the accelerator prepare them (and the validation loader), start the EMA from its weights.

    `train_loader` yields this rank's micro-batches of the launch's split (a `GlobalBatchSampler`; it is
    not sharded again). The learning-rate schedule spans `epochs` of its optimizer steps (or
    `steps_per_epoch` of them, without a training loader). `phases`, when given, times the step's parts."""
    model = configure_model(model, cfgs.train, launch.channels_last)
    loss_fn = DetectionLoss(cfgs.loss, model.head.anchors, model.head.strides, cfgs.model.num_classes)
    optimizer = build_optimizer(model, cfgs.optim, launch.split.global_batch)
    if val_loader is not None:
        model, optimizer, val_loader = accelerator.prepare(model, optimizer, val_loader)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    set_seed(cfgs.train.seed, device_specific=True)  # per-rank streams for stochastic depth

    gather = {"gather": zero3_gather} if launch.zero_stage == 3 else {}  # ZeRO-3 partitions the live weights
    fresh = build_model(cfgs.model).to(accelerator.device)
    if launch.channels_last:  # evaluated in the memory format the model trains in
        fresh = fresh.to(memory_format=torch.channels_last)
    ema = ModelEMA(fresh, accelerator.unwrap_model(model), cfgs.train.ema_decay, cfgs.train.ema_ramp, **gather)
    if train_loader is not None:
        steps_per_epoch = train_loader.batch_sampler.steps
    step = TrainStep(
        model,
        optimizer,
        loss_fn,
        Schedule(cfgs.optim, steps_per_epoch, epochs),
        grad_clip=cfgs.optim.grad_clip,
        global_batch=launch.split.global_batch,
        ema=ema,
        channels_last=launch.channels_last,
        accelerator=accelerator,
        phases=phases,
    )
    return PreparedTraining(step, train_loader, val_loader)


def bare_step(
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    optim: OptimConfig,
    train: TrainConfig,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> TrainStep:
    """A training step of a freshly built model in this process alone, without an Accelerator: the
    same wrapping, loss, optimizer, schedule and EMA as `prepare_training`, one micro-batch per window.
    What the micro-batch probe and `launch/model_info.py` run."""
    with device:  # built where it runs: no copy, and no module conversion (which fake tensors refuse)
        model = configure_model(build_model(model_cfg), train, train.channels_last is True)
        ema = ModelEMA(build_model(model_cfg), model, train.ema_decay, train.ema_ramp)
    return TrainStep(
        model,
        build_optimizer(model, optim, train.global_batch),
        DetectionLoss(loss_cfg, model.head.anchors, model.head.strides, model_cfg.num_classes),
        Schedule(optim, steps_per_epoch=1, epochs=1),
        grad_clip=optim.grad_clip,
        ema=ema,
        channels_last=train.channels_last is True,
        autocast_dtype=autocast_dtype,
    )
