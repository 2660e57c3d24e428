"""One optimizer step of the real engine on every rank, for the tests that compare splits and stages.

    python tests/engine/one_step.py '<spec as JSON>' <out.pt>                       # one process
    accelerate launch --config_file ds_configs/accelerate_zero2.yaml --num_processes 3 \\
        tests/engine/one_step.py '<spec>' <out.pt>

spec: {"overrides": [run config key=value, ...], "distinct": false}. Every rank builds its launch, model,
optimizer, EMA and `TrainStep` as `launch/train.py` does (`start_launch`, `prepare_training`) and trains one
optimizer step of the split's global batch. Without "distinct", every image of the global batch is the
same picture with the same faces, so BatchNorm's batch statistics are the same however the batch is split
and any two splits must give the same step. The main process saves the trained weights, the EMA's, and
what the step ran under; with "fp32_live" every rank also assembles DeepSpeed's fp32 weights
(`safe_get_full_fp32_param`, a collective) for comparison with the EMA's.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from adyolo.config import load_run_config
from adyolo.data.batch import synthetic_batch
from adyolo.engine.accelerator import start_launch
from adyolo.engine.setup import TrainingConfigs, prepare_training, seeded_model


def batch_of(images: int, size: int, distinct: bool, first: int) -> dict:
    """`images` images of a global batch (its images `first`, `first + 1`, ...): copies of one picture with
    the same faces, or (`distinct`) the global batch's own images, each the same wherever it lands."""
    parts = [synthetic_batch(1, size, seed=0 if not distinct else first + i) for i in range(images)]
    targets = []
    for i, part in enumerate(parts):
        rows = part["targets"].clone()
        rows[:, 0] = i
        targets.append(rows)
    return {"images": torch.cat([p["images"] for p in parts]), "targets": torch.cat(targets), "skipped": []}


def main(spec: dict, out: str) -> None:
    cfg = load_run_config(None, spec["overrides"])
    launch, accelerator = start_launch(cfg.train, cfg.optim, os.path.dirname(out) or ".")
    split, rank = launch.split, accelerator.process_index
    configs = TrainingConfigs(cfg.model, cfg.loss, cfg.optim, cfg.train)
    prepared = prepare_training(
        seeded_model(cfg.model, cfg.train.seed), configs, accelerator, launch, epochs=1, steps_per_epoch=10
    )
    # This rank's micro-batches, cut from the global batch in the order the sampler cuts it.
    sizes = [split.micro_sizes(r) for r in range(split.world_size)]
    batches, start = [], 0
    for j in range(split.accumulation):
        for r in range(split.world_size):
            if r == rank:
                batches.append(batch_of(sizes[r][j], cfg.model.img_size, spec.get("distinct", False), start))
            start += sizes[r][j]
    step = prepared.step
    window = step(batches, step=0)
    bare = step.bare
    fp32_live = None
    if spec.get("fp32_live") or launch.zero_stage == 3:
        from deepspeed.utils import safe_get_full_fp32_param

        fp32_live = {name: safe_get_full_fp32_param(p).detach().cpu() for name, p in bare.named_parameters()}
    optimizer = step.optimizer
    while hasattr(optimizer, "optimizer"):  # Accelerate's and DeepSpeed's wrappers
        optimizer = optimizer.optimizer
    if accelerator.is_main_process:
        if launch.zero_stage == 3:
            weights = fp32_live
        else:
            weights = {k: v.detach().cpu().clone() for k, v in bare.state_dict().items()}
        torch.save(
            {
                "weights": weights,
                "ema": {k: v.cpu() for k, v in step.ema.module.state_dict().items()},
                "ema_decay": step.ema.current_decay(),
                "fp32_live": fp32_live,
                "stepped": window.stepped,
                "loss": window.losses(),
                "split": str(split),
                "accumulation": split.accumulation,
                "optimizer": type(optimizer).__name__,
                # Parameters DeepSpeed all-gathers in the autocast dtype for a forward (ZeRO-3, torch_autocast).
                "lowered": [n for n, p in bare.named_parameters() if hasattr(p, "comm_dtype")],
            },
            out,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), sys.argv[2])
    sys.stdout.flush()
    os._exit(0)  # skip interpreter finalisation, where gloo's threads can abort the process
