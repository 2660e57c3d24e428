"""The tensor memory a real training step allocates on the CPU, per rank: what the plan is checked against.

    accelerate launch --config_file ds_configs/accelerate_zero2.yaml --num_processes 2 \\
        -m adyolo.plan.measure '<run config overrides as JSON list>' <output folder>

Every rank builds its run as `launch/train.py` does (Accelerator, DeepSpeed engine or DDP, model
wrapping, optimizer, EMA, `TrainStep`) and trains two optimizer steps on a synthetic batch, all inside
`PeakMemTracker`, so every tensor any of them allocates (DeepSpeed's flat buffers and gradient buckets,
DDP's buckets, activations, optimizer state) counts. Each rank writes `rank<r>.json` with its peak of
live tensor bytes during the second step (the steady state: the optimizer's state exists from the first).
On a GPU the same peak is `torch.cuda.max_memory_allocated`; here nothing else can count it exactly,
as the process's RSS holds the framework too.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from adyolo.config import load_run_config
from adyolo.engine.accelerator import start_launch
from adyolo.engine.batching import synthetic_micro_batches
from adyolo.engine.setup import TrainingConfigs, prepare_training, seeded_model
from adyolo.plan.trace import PeakMemTracker, categories


def measure_run(overrides: list[str], out: Path, config: str | None = None) -> dict:
    """This rank's measured tensor peak (bytes) of the second training step, and its split."""
    cfg = load_run_config(config, overrides)
    tracker = PeakMemTracker()
    with tracker:
        launch, accelerator = start_launch(cfg.train, cfg.optim, out)
        split, zero_stage = launch.split, launch.zero_stage
        configs = TrainingConfigs(cfg.model, cfg.loss, cfg.optim, cfg.train)
        prepared = prepare_training(
            seeded_model(cfg.model, cfg.train.seed), configs, accelerator, launch, epochs=1, steps_per_epoch=1
        )
        device = accelerator.device
        batches = synthetic_micro_batches(split, accelerator.process_index, cfg.model.img_size, device)
        prepared.step.run_window(batches, step=0)
        with tracker.phases() as peaks:
            prepared.step.run_window(batches, step=1)
    backward, optimizer_step = peaks[0], peaks[-1]
    result = {
        "rank": accelerator.process_index,
        "world_size": split.world_size,
        "zero_stage": zero_stage,
        "micro_batch": split.micro_batch,
        "accumulation": split.accumulation,
        "peak_bytes": max(backward["Total"], optimizer_step["Total"]),
        "backward_peak": backward["Total"],
        "step_peak": optimizer_step["Total"],
        "at_peak": categories(max(backward, optimizer_step, key=lambda snap: snap["Total"])),
    }
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def main(argv: list[str]) -> None:
    overrides, out = json.loads(argv[0]), Path(argv[1])
    result = measure_run(overrides, out)
    (out / f"rank{result['rank']}.json").write_text(json.dumps(result))
    # Everything is written; skip interpreter finalisation, where gloo threads can abort the process.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
