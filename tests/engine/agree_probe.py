"""Two ranks whose micro-batch probes answer differently, for `test_ranks_agree_on_the_probed_micro_batch`.

    accelerate launch --config_file ds_configs/accelerate_ddp.yaml --num_processes 2 \\
        tests/engine/agree_probe.py <folder>

Global batch 24 over 2 ranks: rank 0 fits micro-batches up to 6, rank 1 up to 4 (the probe's
out-of-memory answer, made up); each rank writes the split it will train in <folder>/rank<r>.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from adyolo.engine.accelerator import start_launch
from adyolo.engine.autobatch import agree_on_micro_batch
from adyolo.engine.config import OptimConfig, TrainConfig


def main(out: Path) -> None:
    launch, accelerator = start_launch(TrainConfig(global_batch=24, micro_batch="auto"), OptimConfig(), out)
    limit = 6 if accelerator.process_index == 0 else 4

    def fits(micro: int) -> None:
        if micro > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory at micro-batch {micro}")

    agreed = agree_on_micro_batch(accelerator, launch, fits)
    answer = {
        "micro_batch": agreed.split.micro_batch,
        "accumulation": agreed.split.accumulation,
        "accelerator_accumulation": accelerator.gradient_accumulation_steps,
    }
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(answer))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    sys.stdout.flush()
    os._exit(0)  # skip interpreter finalisation, where gloo's threads can abort the process
