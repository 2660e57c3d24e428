"""The benchmark run behind `launch/bench.py`: check every row, run them one after another, measure the
loader, write and log the reports."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from adyolo.bench.grid import AXES, GridError, expand_grid, label, network, overrides, parse_axes
from adyolo.bench.inference import bench_inference
from adyolo.bench.loader import LOADER_BATCH, bench_loader
from adyolo.bench.report import log_to_mlflow, plot, report
from adyolo.bench.runner import run_row
from adyolo.config import load_run_config
from adyolo.engine.cuda_allocator import allocator_setting
from adyolo.model import build_model
from adyolo.model.config import MAX_STRIDE
from adyolo.model.summary import count_gflops, count_parameters, count_training_gflops
from adyolo.schema import ConfigError


@dataclass
class BenchSettings:
    """What `launch/bench.py` asks for (its flags, same names). Grid axes are comma lists."""

    fusion: str = "full,efficient"  # full, efficient, yolov5face (the baseline: model.neck=yolov5face)
    attention: str = "sdpa,explicit"
    precision: str = "fp32"
    checkpoint: str = "off,all"
    zero: str = "0"
    channels_last: str = "off"
    compile: str = "off"
    bucket: str = "json"  # ZeRO rows: reduce/allgather bucket size in elements; json: the stage's file
    overlap_comm: str = "json"  # ZeRO rows: off, on; json: the stage's file
    global_batch: str = "2"
    gpus: int = 1  # processes per row
    micro_batch: int | None = None  # None: global batch / gpus
    size: str = "s"
    img: int = 640
    config: str | None = None  # run YAML for every other setting
    set: list[str] = field(default_factory=list)  # more key=value overrides for every row
    memory_budget_gib: float = 0.0  # emulate a smaller GPU (0: the whole GPU)
    warmup: int = 3
    steps: int = 10
    row_timeout: float = 1200.0
    out: Path | None = None  # None: runs/bench/<time>
    no_mlflow: bool = False
    loader: bool = False
    loader_only: bool = False
    workers: str = "0"
    loader_cache: str = "off,on"  # without / with data.cache (decoded, resized images in RAM)
    loader_batches: int = 20
    data: str | None = None
    profile: bool = False  # also trace a few steps of each row (torch.profiler)
    inference: bool = False  # also time each model's eval forward, BatchNorm folded and not
    inference_only: bool = False  # only that: the grid names the models, no training rows run
    inference_batch: int = 8


def run_benchmark(settings: BenchSettings) -> Path:
    """Run the grid (and the loader); returns the output folder. Raises GridError before any row runs
    for a bad grid value, or when the config rejects every row (with the config's message)."""
    axes = parse_axes({axis: getattr(settings, axis) for axis in AXES})
    if settings.img % MAX_STRIDE:
        raise GridError(f"--img {settings.img} is not a multiple of {MAX_STRIDE}")
    common = {
        "config": settings.config,
        "size": settings.size,
        "img": settings.img,
        "gpus": settings.gpus,
        "micro_batch": settings.micro_batch,
        "overrides": settings.set,
        "memory_budget_gib": settings.memory_budget_gib,
        "warmup": settings.warmup,
        "steps": settings.steps,
        "profile": settings.profile,
    }
    grid = [] if settings.loader_only else expand_grid(axes)
    invalid = check_rows(grid, common)
    if grid and len(invalid) == len(grid):
        raise GridError(invalid[0])
    rows = [] if settings.inference_only else grid

    out = settings.out or Path("runs/bench") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    meta = describe(settings, cuda)
    results = []
    for i, row in enumerate(rows):
        if i in invalid:
            result = {**row, "error": f"invalid: {invalid[i]}"}
        else:
            result = run_row(row, common, out / "rows" / f"{i:02d}", settings.row_timeout)
        results.append(result)
        print(f"{label(row)}: " + json.dumps({k: v for k, v in result.items() if k not in row}), flush=True)
    loader = []
    if settings.loader or settings.loader_only:
        workers = [int(w) for w in settings.workers.split(",") if w]
        cache = [c == "on" for c in settings.loader_cache.split(",") if c]
        loader = bench_loader(workers, cache, settings.img, settings.loader_batches, settings.data)
        meta["loader_setup"] = (
            f"Data loader: {settings.img} px, batch {LOADER_BATCH}, mosaic + affine + HSV + flip, {os.cpu_count()} CPUs"
        )
    inference = []
    if settings.inference or settings.inference_only:
        inference = bench_inference(
            inference_models(grid, invalid, common),
            settings.config,
            settings.img,
            settings.inference_batch,
            settings.steps,
            settings.warmup,
        )
        meta["inference_setup"] = (
            f"Inference: eval forward (before NMS), fp32, batch {settings.inference_batch}, {settings.img} px, "
            f"median of {settings.steps} after {settings.warmup} warm-up, plain and folded timed alternately"
        )
    text = report(results, loader, meta, cuda, inference)
    (out / "bench.md").write_text(text)
    saved = {"meta": meta, "rows": results, "loader": loader, "inference": inference}
    (out / "bench.json").write_text(json.dumps(saved, indent=2))
    files = [out / "bench.md", out / "bench.json"]
    picture = plot(results, out / "bench.png")
    files += [picture] if picture else []
    if not settings.no_mlflow:
        log_to_mlflow(out, results, loader, meta, files, inference)
    print("\n" + text + f"written to {out}/")
    return out


def inference_models(rows: list[dict], invalid: dict[int, str], common: dict) -> list[tuple[str, list[str]]]:
    """Each distinct network of the valid rows, with the overrides of its first row: (name, overrides)."""
    models: dict[str, list[str]] = {}
    for i, row in enumerate(rows):
        name = network(row)
        if i not in invalid and name not in models:
            models[name] = overrides(row, common)
    return list(models.items())


def check_rows(rows: list[dict], common: dict) -> dict[int, str]:
    """Check every row's config and count its FLOPs (into the row) before any row starts. Returns the
    rows whose combination the config rejects (index -> why): those are results, not errors."""
    flops: dict[tuple, tuple[float, float]] = {}
    invalid: dict[int, str] = {}
    for i, row in enumerate(rows):
        try:
            cfg = load_run_config(common["config"], overrides(row, common))
        except ConfigError as err:
            invalid[i] = str(err)
            continue
        # One count per model: the fusion axis names the network (`yolov5face`: the baseline, attention
        # "-"); checkpointing, precision and the rest do not change the model's FLOPs.
        key = (row["fusion"], row["attention"])
        if key not in flops:
            model = build_model(cfg.model)
            flops[key] = (
                count_parameters(model) / 1e6,
                count_training_gflops(model, common["img"]),
                count_gflops(model, common["img"]),
            )
        row["params_m"], row["train_gflops_per_image"], row["gflops_per_image"] = flops[key]
    return invalid


def describe(settings: BenchSettings, cuda: bool) -> dict:
    """The setup a reader needs beside the numbers: device, versions, date, what was measured."""
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    budget = f", each process limited to {settings.memory_budget_gib:g} GiB" if settings.memory_budget_gib else ""
    # The rows' workers set it as training does (`configure_cuda_allocator`).
    allocator = f", allocator {allocator_setting().conf or 'default'}" if cuda else ""
    machine = f"{settings.gpus} x {device}{budget}{allocator}; torch {torch.__version__}, {_versions()}"
    return {
        "date": dt.date.today().isoformat(),
        "device": device,
        "gpus_per_row": settings.gpus,
        "torch": torch.__version__,
        "size": settings.size,
        "img": settings.img,
        "memory_budget_gib": settings.memory_budget_gib,
        "machine": machine,
        "setup": (
            f"{machine}; size {settings.size}, {settings.img} px; "
            f"median of {settings.steps} optimizer steps after {settings.warmup} warm-up; "
            "synthetic batch on the device; TFLOP/s = model FLOPs (forward + backward, flop_counter) x img/s, "
            "all ranks together"
        ),
    }


def _versions() -> str:
    found = []
    for package in ("deepspeed", "accelerate"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            pass
    return ", ".join(found)
