"""The training objects around a built detector, as `launch/train.py` trains it and `launch/bench.py` times it.

One place, so that the benchmark measures exactly the model wrapping (SyncBatchNorm, channels_last,
torch.compile), loss, optimizer, Accelerate/DeepSpeed preparation and EMA that training uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from adyolo.config import RunConfig
from adyolo.engine.batching import BatchSplit
from adyolo.engine.ema import ModelEMA, zero3_gather
from adyolo.engine.optim import build_optimizer
from adyolo.loss.criterion import DetectionLoss
from adyolo.model import build_model


@dataclass
class PreparedTraining:
    model: torch.nn.Module  # prepared (DDP / DeepSpeed engine / bare)
    optimizer: torch.optim.Optimizer  # prepared
    loss_fn: DetectionLoss
    ema: ModelEMA
    loaders: list  # prepared, in the order given


def prepare_training(
    model: torch.nn.Module,
    cfg: RunConfig,
    accelerator: Accelerator,
    split: BatchSplit,
    zero_stage: int,
    loaders: tuple = (),
) -> PreparedTraining:
    """Wrap `model` (freshly built, identical on every rank) as the config asks, build its loss and
    optimizer, let the accelerator prepare them with `loaders`, and start the EMA from its weights."""
    if cfg.train.sync_batchnorm and torch.cuda.is_available():
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        model.compile()  # in place: the state dict keys, EMA and checkpoints stay as they are
    loss_fn = DetectionLoss(cfg.loss, model.head.anchors, model.head.strides, cfg.model.num_classes)
    optimizer = build_optimizer(model, cfg.optim, split.global_batch)
    model, optimizer, *loaders = accelerator.prepare(model, optimizer, *loaders)
    set_seed(cfg.train.seed, device_specific=True)  # per-rank streams for stochastic depth

    gather = {"gather": zero3_gather} if zero_stage == 3 else {}  # ZeRO-3 partitions the live weights
    ema = ModelEMA(
        build_model(cfg.model).to(accelerator.device),
        accelerator.unwrap_model(model),
        cfg.train.ema_decay,
        cfg.train.ema_ramp,
        **gather,
    )
    return PreparedTraining(model, optimizer, loss_fn, ema, list(loaders))
