"""Memory and speed of real training steps for a grid of configurations, measured side by side in one run.

    python launch/bench.py                                   # the default grid on this machine's GPUs (or CPU)
    python launch/bench.py --fusion full --attention sdpa,explicit --precision fp32,bf16 --checkpoint off,all
    python launch/bench.py --zero 0,2,3 --gpus 8 --memory-budget-gib 16
    python launch/bench.py --loader --workers 0,4,8,16       # also the data loader's images/s
    python launch/bench.py --fusion yolov5face,efficient,full --attention sdpa   # against the baseline

Each row is one training configuration: fusion (full, efficient, or yolov5face: the YOLOv5-Face
baseline, `model.neck=yolov5face`, PAN neck with 3 levels and no GD fusion), attention (sdpa, explicit; full
only), precision (fp32, bf16), activation checkpointing (off, all, or blocks joined with "+"), ZeRO
stage (0: plain DDP, 1, 2, 2_offload, 3), channels_last, torch.compile and, for ZeRO rows, DeepSpeed's
bucket size (`--bucket`, elements) and `--overlap-comm` (both default to the stage's JSON). A row runs in fresh
processes, one per GPU (`accelerate launch` with the matching ds_configs/ JSON), and times what
`launch/train.py` runs: the same Accelerator, DeepSpeed engine, optimizer, schedule, loss, EMA and
training step (`adyolo.engine.step.TrainStep`), on one synthetic batch kept on the device (so the data
loader is not in the measurement) at the global batch (default 40) and image size (default 640).

For each row: peak allocated and reserved device memory of every rank (peak RSS on CPU), images/s
(global batch / median optimizer-step time over the timed steps after warm-up, CUDA-synchronised),
and achieved TFLOP/s (model FLOPs of forward + backward from `torch.utils.flop_counter`, so
checkpointing's recompute does not count as work). An out-of-memory error is a result ("OOM"):
the rank that hits it records it and exits, and the launcher stops the others.
`--memory-budget-gib X` caps each process at X GiB (`torch.cuda.set_per_process_memory_fraction`)
to emulate a smaller GPU. `--loader` also measures the training data loader (full augmentation)
per worker count, so the two can be compared. `--profile` traces two more steps of each row with
torch.profiler: a Perfetto/Chrome trace per row and its top operators by self time in bench.md.
`--inference` times each network's eval forward (fp32, before NMS) plain and BatchNorm-folded (detect.py's).

Writes bench.md (tables, target checks), bench.json and bench.png to --out (default
runs/bench/<time>), and logs them with one metric per row to MLflow (<out>/mlflow.db unless
$MLFLOW_TRACKING_URI is set). Exit code 2: a bad grid value or config, before any row runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from adyolo.bench.grid import ZERO_CHOICES, GridError
from adyolo.bench.main import BenchSettings, run_benchmark
from adyolo.schema import ConfigError


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    grid = parser.add_argument_group("grid (comma lists; every combination is a row)")
    grid.add_argument(
        "--fusion", default="full,efficient", help="full, efficient, yolov5face (the baseline: model.neck=yolov5face)"
    )
    grid.add_argument("--attention", default="sdpa,explicit", help="sdpa, explicit (full only)")
    grid.add_argument("--precision", default="bf16" if cuda else "fp32", help="fp32, bf16")
    grid.add_argument("--checkpoint", default="off,all", help='off, all, or block names joined with "+"')
    grid.add_argument("--zero", default="0", help=f"ZeRO stage: {', '.join(ZERO_CHOICES)} (0: plain DDP)")
    grid.add_argument("--channels-last", default="off", help="off, on")
    grid.add_argument("--compile", default="off", help="off, on (torch.compile)")
    grid.add_argument("--bucket", default="json", help="ZeRO rows: reduce/allgather bucket in elements, e.g. 5e6")
    grid.add_argument("--overlap-comm", default="json", help="ZeRO rows: off, on (json: as ds_configs/ says)")
    grid.add_argument("--global-batch", default="40" if cuda else "2", help="images per optimizer step")
    parser.add_argument("--gpus", type=int, default=max(1, torch.cuda.device_count()), help="processes per row")
    parser.add_argument("--micro-batch", type=int, help="images per rank per pass (default: global / gpus)")
    parser.add_argument("--size", default="s", choices=["n", "s", "m"])
    parser.add_argument("--img", type=int, default=640, help="square image size, a multiple of 32")
    parser.add_argument("--config", help="run YAML for every other setting (loss, optimizer, ...)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides for every row")
    parser.add_argument("--memory-budget-gib", type=float, default=0.0, help="emulate a smaller GPU (0: whole GPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--row-timeout", type=float, default=1200, help="seconds before a row counts as hung")
    parser.add_argument("--out", type=Path, help="folder for bench.md, bench.json, bench.png (and MLflow)")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--loader", action="store_true", help="also measure the data loader")
    parser.add_argument("--loader-only", action="store_true", help="measure only the data loader")
    parser.add_argument("--workers", default=f"0,{os.cpu_count() // 2},{os.cpu_count()}", help="loader workers")
    parser.add_argument("--loader-cache", default="off,on", help="loader: without / with data.cache (images in RAM)")
    parser.add_argument("--loader-batches", type=int, default=20, help="timed loader batches per worker count")
    parser.add_argument("--data", help="loader: image folder or list (default: the synthetic dataset)")
    parser.add_argument("--profile", action="store_true", help="also trace a few steps per row (torch.profiler)")
    parser.add_argument("--inference", action="store_true", help="also time eval forward, BatchNorm folded and not")
    parser.add_argument("--inference-only", action="store_true", help="time only that (the grid names the models)")
    parser.add_argument("--inference-batch", type=int, default=8, help="images per inference forward")
    return parser.parse_args()


def main() -> int:
    try:
        run_benchmark(BenchSettings(**vars(parse_args())))
    except (GridError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
