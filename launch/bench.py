"""Memory and speed of real training steps for a grid of configurations, measured side by side in one run.

    python launch/bench.py                                   # the default grid on this machine's GPUs (or CPU)
    python launch/bench.py --fusion full --attention sdpa,explicit --precision fp32,bf16 --checkpoint off,all
    python launch/bench.py --zero 0,2,3 --gpus 8 --memory-budget-gib 16
    python launch/bench.py --loader --workers 0,4,8,16       # also the data loader's images/s

Each row is one training configuration: fusion (full, efficient), attention (sdpa, explicit; full
only), precision (fp32, bf16), activation checkpointing (off, all, or blocks joined with "+"), ZeRO
stage (0: plain DDP, 1, 2, 2_offload, 3), channels_last and torch.compile. A row runs in fresh
processes, one per GPU (`accelerate launch` with the matching ds_configs/ JSON), and times what
`launch/train.py` runs: the same Accelerator, DeepSpeed engine, optimizer, schedule, loss, EMA and
`Trainer.train_step`, on one synthetic batch kept on the device (so the data loader is not in the
measurement) at the global batch (default 40) and image size (default 640).

For each row: peak allocated and reserved device memory of every rank (peak RSS on CPU), images/s
(global batch / median optimizer-step time over the timed steps after warm-up, CUDA-synchronised),
and achieved TFLOP/s (model FLOPs of forward + backward from `torch.utils.flop_counter`, so
checkpointing's recompute does not count as work). An out-of-memory error is a result ("OOM"):
the rank that hits it records it and exits, and the launcher stops the others.
`--memory-budget-gib X` caps each process at X GiB (`torch.cuda.set_per_process_memory_fraction`)
to emulate a smaller GPU. `--loader` also measures the training data loader (full augmentation)
per worker count, so the two can be compared.

Writes bench.md (tables, target checks), bench.json and bench.png to --out (default
runs/bench/<time>), and logs them with one metric per row to MLflow (<out>/mlflow.db unless
$MLFLOW_TRACKING_URI is set).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from adyolo.engine.batching import split_global_batch

ROOT = Path(__file__).resolve().parents[1]
DS_CONFIGS = ROOT / "ds_configs"
ZERO_CHOICES = ("0", "1", "2", "2_offload", "3")
GPU_SIZES_GIB = (16, 24, 40, 80, 141)  # the GPUs a row can be said to fit
EXIT_OOM = 17  # a rank ran out of memory; recorded in its rank file
GIB = 2**30


# ---------------------------------------------------------------------------------------------
# The grid (parent process)


def expand_grid(args: argparse.Namespace) -> list[dict]:
    """Rows for every combination on the command line; attention varies only for the full variant."""
    rows, seen = [], set()
    axes = itertools.product(
        args.global_batch,
        args.fusion,
        args.attention,
        args.precision,
        args.checkpoint,
        args.zero,
        args.channels_last,
        args.compile,
    )
    for batch, fusion, attention, precision, ckpt, zero, cl, compiled in axes:
        row = {
            "global_batch": batch,
            "fusion": fusion,
            "attention": attention if fusion == "full" else "-",
            "precision": precision,
            "checkpoint": ckpt,
            "zero": zero,
            "channels_last": cl == "on",
            "compile": compiled == "on",
        }
        key = tuple(row.values())
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows


def label(row: dict) -> str:
    """A short unique name, e.g. `full/sdpa bf16 ckpt=all z2 cl compile b40`."""
    parts = [
        f"{row['fusion']}/{row['attention']}" if row["fusion"] == "full" else row["fusion"],
        row["precision"],
        f"ckpt={row['checkpoint']}",
        f"z{row['zero']}" if row["zero"] != "0" else "ddp",
    ]
    parts += ["cl"] * row["channels_last"] + ["compile"] * row["compile"] + [f"b{row['global_batch']}"]
    return " ".join(parts)


def overrides(row: dict, common: dict) -> list[str]:
    """The `key=value` overrides that turn the run config into this row's."""
    ckpt = [] if row["checkpoint"] == "off" else row["checkpoint"].split("+")
    model = [f"model.fusion={row['fusion']}", f"model.checkpoint=[{','.join(ckpt)}]"]
    if row["fusion"] == "full":
        model.append(f"model.attention={row['attention']}")
    return [
        *model,
        f"model.size={common['size']}",
        f"model.img_size={common['img']}",
        f"train.global_batch={row['global_batch']}",
        f"train.precision={row['precision']}",
        f"train.channels_last={str(row['channels_last']).lower()}",
        f"train.compile={str(row['compile']).lower()}",
        *([f"train.micro_batch={common['micro_batch']}"] if common["micro_batch"] else []),
        *common["overrides"],
    ]


def launch_command(row: dict, common: dict, row_dir: Path) -> list[str]:
    """One process per GPU through `accelerate launch`; a single DDP process needs no launcher."""
    measure = [str(Path(__file__).resolve()), "--measure", json.dumps({**row, **common}), "--out", str(row_dir)]
    if row["zero"] == "0" and common["gpus"] == 1:
        return [sys.executable, *measure]
    if row["zero"] == "0":
        launcher = ["--config_file", str(DS_CONFIGS / "accelerate_ddp.yaml")]
    else:
        # The stage's JSON with this row's precision: under DeepSpeed, precision lives in the JSON.
        # The batch fields too: without a data loader to read them from, accelerate needs them stated.
        split = split_global_batch(row["global_batch"], common["gpus"], common["micro_batch"])
        ds = json.loads((DS_CONFIGS / f"zero{row['zero']}.json").read_text())
        ds["torch_autocast"] = {"enabled": row["precision"] == "bf16", "dtype": "bfloat16"}
        ds.update(
            train_micro_batch_size_per_gpu=split.micro_batch,
            gradient_accumulation_steps=split.accumulation,
            train_batch_size=split.global_batch,
        )
        (row_dir / "deepspeed.json").write_text(json.dumps(ds, indent=2))
        launcher = [
            "--config_file",
            str(DS_CONFIGS / f"accelerate_zero{row['zero']}.yaml"),
            "--deepspeed_config_file",
            str(row_dir / "deepspeed.json"),
        ]
    accelerate = Path(sys.executable).with_name("accelerate")
    ports = ["--main_process_port", "0"]
    return [str(accelerate), "launch", *launcher, "--num_processes", str(common["gpus"]), *ports, *measure]


def run_row(row: dict, common: dict, row_dir: Path, timeout_s: float) -> dict:
    """Measure one row in fresh processes; OOM, a crash or a hang become the row's result."""
    row_dir.mkdir(parents=True, exist_ok=True)
    command = launch_command(row, common, row_dir)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(row_dir / "log.txt", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank
            proc.wait()
            returncode = None
    return {**row, **collect(row_dir, returncode)}


def collect(row_dir: Path, returncode: int | None) -> dict:
    """What a row's processes left behind: the result, the first rank's OOM, or why there is neither."""
    ooms = sorted(row_dir.glob("oom-rank*.json"))
    if ooms:
        return json.loads(ooms[0].read_text())
    result = row_dir / "result.json"
    if returncode == 0 and result.is_file():
        return json.loads(result.read_text())
    if returncode is None:
        return {"error": "timed out"}
    lines = (row_dir / "log.txt").read_text(errors="replace").strip().splitlines()
    # The first exception message, not the launcher's ChildFailedError that follows it.
    errors = [line for line in lines if re.search(r"\w+(Error|Exception): ", line) and "ChildFailedError" not in line]
    errors = errors or [line for line in lines if "terminate called" in line or "Signal" in line]
    return {"error": f"exit {returncode}: {(errors or lines[-1:] or ['no output'])[0].strip()[:200]}"}


# ---------------------------------------------------------------------------------------------
# One row (every rank)


def measure(spec: dict, out: Path) -> int:
    """Run a row's training steps on this rank; the main process writes result.json. Returns the exit code."""
    rank = int(os.environ.get("RANK", "0"))
    try:
        result = _train_steps(spec, out)
    except torch.OutOfMemoryError as err:
        return record_oom(out, rank, err)
    except RuntimeError as err:  # DeepSpeed and NCCL rewrap some allocation failures
        if "out of memory" not in str(err).lower():
            raise
        return record_oom(out, rank, err)
    if result is not None:
        (out / "result.json").write_text(json.dumps(result))
    return 0


def record_oom(out: Path, rank: int, err: BaseException) -> int:
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    (out / f"oom-rank{rank}.json").write_text(json.dumps({"oom": message[:200], "oom_rank": rank}))
    return EXIT_OOM


def _train_steps(spec: dict, out: Path) -> dict | None:
    # Imported here: the parent process never needs accelerate, DeepSpeed or the model.
    from adyolo.config import load_run_config
    from adyolo.engine.accelerator import build_accelerator
    from adyolo.engine.checkpoint import TrainingState
    from adyolo.engine.memory import FIELDS, snapshot
    from adyolo.engine.optim import Schedule
    from adyolo.engine.setup import prepare_training
    from adyolo.engine.tracking import Tracker
    from adyolo.engine.trainer import Trainer, TrainerParts, Window
    from adyolo.model import build_model

    cfg = load_run_config(spec["config"], overrides(spec, spec))
    cfg.output_dir = str(out)
    accelerator, split, precision, zero_stage = build_accelerator(cfg.train, cfg.optim, out)
    device = accelerator.device
    if device.type == "cuda" and spec["memory_budget_gib"]:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["memory_budget_gib"] * GIB / total), device)
    torch.manual_seed(0)
    prepared = prepare_training(build_model(cfg.model), cfg, accelerator, split, zero_stage)
    parts = TrainerParts(
        accelerator,
        prepared.model,
        prepared.optimizer,
        prepared.loss_fn,
        train_loader=None,
        val_loader=None,
        ema=prepared.ema,
        schedule=Schedule(cfg.optim, steps_per_epoch=1000, epochs=1),
        state=TrainingState(),
        tracker=Tracker(False, "", "", out),
    )
    trainer = Trainer(parts, cfg, precision, config_dict={})
    batch = synthetic_batch(split.micro_batch, cfg.model.img_size, device, seed=accelerator.process_index)

    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        _synchronize(device)
        start = time.perf_counter()
        window = Window()
        while not trainer.train_step(batch, window):
            pass
        _synchronize(device)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - start)
    seconds = torch.tensor([statistics.median(times)], device=device)
    memory = accelerator.gather(snapshot(device).to(device)[None]).cpu()
    slowest = float(accelerator.gather(seconds).max())
    # Every rank past its last collective before any tears the process group down: a gloo rank
    # whose peer is already gone can abort at exit.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if not accelerator.is_main_process:
        return None
    ranks = [dict(zip(FIELDS, values)) for values in memory.tolist()]
    return {
        "world_size": split.world_size,
        "micro_batch": split.micro_batch,
        "accumulation": split.accumulation,
        "precision_resolved": precision,
        "zero_stage": zero_stage,
        "ms_per_step": 1000 * slowest,
        "images_per_s": split.global_batch / slowest,
        "ranks": ranks,
        "peak_allocated_gib": max(r["peak_allocated_gib"] for r in ranks),
        "peak_reserved_gib": max(r["peak_reserved_gib"] for r in ranks),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def synthetic_batch(images: int, size: int, device: torch.device, seed: int) -> dict:
    """Random pixels and 12 faces per image from 6 to 160 px (every head gets targets), on the device;
    the layout `FaceDataset`'s collate produces (targets [M, 16]: image, class, cx cy w h, 5 points)."""
    gen = torch.Generator().manual_seed(seed)
    faces = 12
    side = torch.exp(torch.empty(images * faces).uniform_(float(torch.log(torch.tensor(6.0))), 5.08, generator=gen))
    side = side.clamp(max=size / 2)
    centre = side[:, None] / 2 + torch.rand(images * faces, 2, generator=gen) * (size - side[:, None])
    points = centre[:, None, :] + (torch.rand(images * faces, 5, 2, generator=gen) - 0.5) * side[:, None, None] * 0.6
    targets = torch.cat(
        [
            torch.arange(images).repeat_interleave(faces).float()[:, None],
            torch.zeros(images * faces, 1),
            centre,
            side[:, None].expand(-1, 2),
            points.flatten(1),
        ],
        dim=1,
    )
    pixels = torch.randint(0, 256, (images, 3, size, size), dtype=torch.uint8, generator=gen)
    return {"images": pixels.to(device), "targets": targets.to(device), "skipped": 0}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# The data loader


def bench_loader(workers: list[int], img: int, batch: int, batches: int, data: str | None) -> list[dict]:
    """Images/s of the augmented training loader for each worker count (after one warm-up batch)."""
    from adyolo.data.config import DataConfig
    from adyolo.data.dataset import FaceDataset, build_loader, list_images
    from adyolo.data.synthetic import ensure_synthetic_dataset

    cfg = DataConfig()
    source = data or ensure_synthetic_dataset(cfg.synthetic_root, cfg.synthetic)["train"]
    dataset = FaceDataset(list_images(source), img, cfg.augment)
    rows = []
    for num_workers in workers:
        loader = build_loader(dataset, batch, shuffle=True, workers=num_workers, seed=0)
        stream = (b for _ in itertools.count() for b in loader)  # epoch after epoch, like training
        next(stream)  # worker start-up is not throughput
        start, images = time.perf_counter(), 0
        for _ in range(batches):
            images += len(next(stream)["images"])
        rows.append({"workers": num_workers, "images_per_s": images / (time.perf_counter() - start)})
        del stream, loader
    return rows


# ---------------------------------------------------------------------------------------------
# Reports


def fits(row: dict) -> str:
    """The smallest common GPU that holds the row's peak reserved memory plus ~1 GiB of CUDA context."""
    need = row["peak_reserved_gib"] + 1.0
    sizes = [s for s in GPU_SIZES_GIB if s >= need]
    return f"{sizes[0]} GiB" if sizes else f"> {GPU_SIZES_GIB[-1]} GiB"


def model_table(rows: list[dict], cuda: bool) -> str:
    ran = [r for r in rows if "images_per_s" in r]
    ref = ran[0] if ran else None
    memory = "peak alloc GiB per rank | peak reserved GiB (max)" if cuda else "peak RSS GiB per rank | (same)"
    lines = [
        f"| configuration | micro x ranks x accum | {memory} | img/s | TFLOP/s | img/s vs first | "
        "memory vs first | fits |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = label(r)
        if "images_per_s" not in r:
            reason = f"OOM (rank {r['oom_rank']}): {r['oom']}" if "oom" in r else r["error"]
            lines.append(f"| {name} | | {reason} | | - | - | - | - | {'no' if 'oom' in r else '-'} |")
            continue
        per_rank = " / ".join(f"{x['peak_allocated_gib']:.2f}" for x in r["ranks"])
        split = f"{r['micro_batch']} x {r['world_size']} x {r['accumulation']}"
        tflops = r["images_per_s"] * r["train_gflops_per_image"] / 1e3
        lines.append(
            f"| {name} | {split} | {per_rank} | {r['peak_reserved_gib']:.2f} | {r['images_per_s']:.1f} | "
            f"{tflops:.3g} | {r['images_per_s'] / ref['images_per_s']:.2f}x | "
            f"{r['peak_allocated_gib'] / ref['peak_allocated_gib']:.2f}x | {fits(r) if cuda else '-'} |"
        )
    return "\n".join(lines) + "\n"


def loader_table(rows: list[dict]) -> str:
    lines = ["| loader workers | images/s |", "|---|---|"]
    return "\n".join(lines + [f"| {r['workers']} | {r['images_per_s']:.0f} |" for r in rows]) + "\n"


def _same_but(row: dict, other: dict, *keys: str) -> bool:
    settings = ("global_batch", "precision", "checkpoint", "zero", "channels_last", "compile")
    return all(row[k] == other[k] for k in settings if k not in keys)


def target_checks(rows: list[dict], loader: list[dict], budget_gib: float) -> list[str]:
    """The benchmark's targets, read off the measured rows; a target without its rows says so."""
    ran = [r for r in rows if "images_per_s" in r]
    sdpa = [r for r in ran if r["fusion"] == "full" and r["attention"] == "sdpa" and r["precision"] == "bf16"]
    pairs = [(f, e) for f in sdpa for e in ran if e["fusion"] == "efficient" and _same_but(f, e)]
    checks = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    if pairs:
        full, eff = min(pairs, key=lambda p: p[0]["peak_allocated_gib"] / p[1]["peak_allocated_gib"])
        ratio = full["peak_allocated_gib"] / eff["peak_allocated_gib"]
        checks.append(
            f"full/sdpa peak memory <= 1.3x efficient: {ratio:.2f}x ({label(full)}) - {verdict(ratio <= 1.3)}"
        )
        full, eff = max(pairs, key=lambda p: p[0]["images_per_s"] / p[1]["images_per_s"])
        ratio = full["images_per_s"] / eff["images_per_s"]
        checks.append(f"full/sdpa img/s >= 0.75x efficient: {ratio:.2f}x ({label(full)}) - {verdict(ratio >= 0.75)}")
    else:
        checks.append("full/sdpa vs efficient: no bf16 pair with the same settings measured")
    ckpt = [r for r in sdpa if r["checkpoint"] != "off"]
    if ckpt:
        best = min(ckpt, key=lambda r: r["peak_reserved_gib"])
        within = budget_gib == 16 or best["peak_reserved_gib"] + 1.0 <= 16
        how = "run under a 16 GiB budget" if budget_gib == 16 else "peak reserved + 1 GiB context"
        checks.append(
            f"full/sdpa with checkpointing fits 16 GiB: {best['peak_reserved_gib']:.2f} GiB reserved ({how}; "
            f"{label(best)}) - {verdict(within)}"
        )
    explicit = [r for r in ran if r["attention"] == "explicit" and r["precision"] == "fp32" and not r["compile"]]
    if explicit and ran:
        slow = min(explicit, key=lambda r: r["images_per_s"])
        peers = [r for r in ran if r["global_batch"] == slow["global_batch"]]
        fastest = max(peers, key=lambda r: r["images_per_s"])
        ratio = fastest["images_per_s"] / slow["images_per_s"]
        checks.append(
            f"fastest >= 2.5x fp32 eager explicit at batch {slow['global_batch']}: {ratio:.2f}x "
            f"({label(fastest)}) - {verdict(ratio >= 2.5)}"
        )
    else:
        checks.append("fastest vs fp32 eager explicit: no fp32 explicit row ran (add it, at a batch where it fits)")
    if loader and ran:
        best_loader = max(r["images_per_s"] for r in loader)
        fastest = max(r["images_per_s"] for r in ran)
        checks.append(
            f"loader keeps up: {best_loader:.0f} img/s vs fastest training {fastest:.0f} img/s - "
            f"{verdict(best_loader > fastest)}"
        )
    return checks


def plot(rows: list[dict], path: Path) -> Path | None:
    """Peak memory and img/s per configuration, side by side."""
    ran = [r for r in rows if "images_per_s" in r]
    if not ran:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [label(r) for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.5), sharey=True)
    y = range(len(rows))
    memory = [r.get("peak_allocated_gib", 0.0) for r in rows]
    left.barh(y, memory, color=["tab:red" if "oom" in r else "tab:blue" for r in rows])
    left.set_yticks(list(y), names, fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("peak allocated GiB (max over ranks; red: OOM)")
    right.barh(y, [r.get("images_per_s", 0.0) for r in rows], color="tab:green")
    right.set_xlabel("images/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(rows: list[dict], loader: list[dict], meta: dict, cuda: bool) -> str:
    text = [f"# Benchmark, {meta['date']}", "", meta["setup"], ""]
    if rows:
        text += [model_table(rows, cuda), ""]
    if loader:
        text += [meta["loader_setup"], "", loader_table(loader), ""]
    if rows:
        text += ["Targets:", ""] + [f"- {c}" for c in target_checks(rows, loader, meta["memory_budget_gib"])]
    return "\n".join(text) + "\n"


def log_to_mlflow(out: Path, rows: list[dict], loader: list[dict], meta: dict, files: list[Path]) -> None:
    from adyolo.engine.tracking import Tracker, tracking_uri

    tracker = Tracker(True, tracking_uri(None, out), "adyolo-bench", out, run_name=f"bench {meta['date']}")
    tracker.log_params({k: v for k, v in meta.items() if k not in ("setup", "loader_setup")})
    metrics = {}
    for r in rows:
        name = label(r).replace("=", "-").replace("+", "_")
        if "images_per_s" in r:
            metrics[f"{name}/images_per_s"] = r["images_per_s"]
            metrics[f"{name}/tflops"] = r["images_per_s"] * r["train_gflops_per_image"] / 1e3
            for rank, mem in enumerate(r["ranks"]):
                metrics[f"{name}/rank{rank}/peak_allocated_gib"] = mem["peak_allocated_gib"]
                metrics[f"{name}/rank{rank}/peak_reserved_gib"] = mem["peak_reserved_gib"]
        else:
            metrics[f"{name}/oom"] = float("oom" in r)
    metrics.update({f"loader/workers{r['workers']}/images_per_s": r["images_per_s"] for r in loader})
    tracker.log_metrics(metrics, step=0)
    for path in files:
        tracker.log_artifact(path)
    tracker.finish()


# ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one row on this rank
    cuda = torch.cuda.is_available()
    grid = parser.add_argument_group("grid (comma lists; every combination is a row)")
    grid.add_argument("--fusion", default="full,efficient")
    grid.add_argument("--attention", default="sdpa,explicit", help="sdpa, explicit (full only)")
    grid.add_argument("--precision", default="bf16" if cuda else "fp32", help="fp32, bf16")
    grid.add_argument("--checkpoint", default="off,all", help='off, all, or block names joined with "+"')
    grid.add_argument("--zero", default="0", help=f"ZeRO stage: {', '.join(ZERO_CHOICES)} (0: plain DDP)")
    grid.add_argument("--channels-last", default="off", help="off, on")
    grid.add_argument("--compile", default="off", help="off, on (torch.compile)")
    grid.add_argument("--global-batch", default="40" if cuda else "2", help="images per optimizer step")
    parser.add_argument("--gpus", type=int, help="processes per row (default: all GPUs, or 1 on CPU)")
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
    parser.add_argument("--loader-batches", type=int, default=20, help="timed loader batches per worker count")
    parser.add_argument("--data", help="loader: image folder or list (default: the synthetic dataset)")
    args = parser.parse_args()
    if args.measure:
        return args
    for key in ("fusion", "attention", "precision", "checkpoint", "zero", "channels_last", "compile", "global_batch"):
        setattr(args, key, [v for v in getattr(args, key).split(",") if v])
    allowed = {
        "fusion": ("full", "efficient"),
        "attention": ("sdpa", "explicit"),
        "precision": ("fp32", "bf16"),
        "zero": ZERO_CHOICES,
        "channels_last": ("off", "on"),
        "compile": ("off", "on"),
    }
    for key, choices in allowed.items():
        bad = [v for v in getattr(args, key) if v not in choices]
        if bad:
            parser.error(f"--{key.replace('_', '-')}: unknown {bad[0]!r}; choose from {', '.join(choices)}")
    if not all(b.isdigit() and int(b) > 0 for b in args.global_batch):
        parser.error(f"--global-batch takes positive integers, got {','.join(args.global_batch)}")
    args.global_batch = [int(b) for b in args.global_batch]
    if args.img % 32:
        parser.error(f"--img {args.img} is not a multiple of 32")
    if args.gpus is None:
        args.gpus = max(1, torch.cuda.device_count())
    return args


def main() -> int:
    args = parse_args()
    if args.measure:
        code = measure(json.loads(args.measure), args.out)
        # Everything is written. Skip interpreter finalisation, where gloo's worker threads can still
        # hold tensors and abort the process (SIGABRT) on CPU runs.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    from adyolo.config import load_run_config
    from adyolo.model import build_model
    from adyolo.model.summary import count_parameters, count_training_gflops
    from adyolo.schema import ConfigError

    out = args.out or Path("runs/bench") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    common = {
        "config": args.config,
        "size": args.size,
        "img": args.img,
        "gpus": args.gpus,
        "micro_batch": args.micro_batch,
        "overrides": args.set,
        "memory_budget_gib": args.memory_budget_gib,
        "warmup": args.warmup,
        "steps": args.steps,
    }
    rows = [] if args.loader_only else expand_grid(args)
    # Every row's config is checked (and its FLOPs counted) before any row starts. A combination the
    # grid made that the config rejects is that row's result; an error in every row stops here.
    flops: dict[tuple, tuple[float, float]] = {}
    invalid: dict[int, str] = {}
    for i, row in enumerate(rows):
        try:
            cfg = load_run_config(args.config, overrides(row, common))
        except ConfigError as err:
            invalid[i] = str(err)
            continue
        key = (row["fusion"], row["attention"])
        if key not in flops:
            model = build_model(cfg.model)
            flops[key] = (count_parameters(model) / 1e6, count_training_gflops(model, args.img))
        row["params_m"], row["train_gflops_per_image"] = flops[key]

    if rows and len(invalid) == len(rows):
        print(f"error: {invalid[0]}", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    budget = f", each process limited to {args.memory_budget_gib:g} GiB" if args.memory_budget_gib else ""
    meta = {
        "date": dt.date.today().isoformat(),
        "device": device,
        "gpus_per_row": args.gpus,
        "torch": torch.__version__,
        "size": args.size,
        "img": args.img,
        "memory_budget_gib": args.memory_budget_gib,
        "setup": (
            f"{args.gpus} x {device}{budget}; torch {torch.__version__}, {_versions()}; size {args.size}, "
            f"{args.img} px; median of {args.steps} optimizer steps after {args.warmup} warm-up; synthetic batch "
            f"on the device; TFLOP/s = model FLOPs (forward + backward, flop_counter) x img/s, all ranks together"
        ),
    }
    results = []
    for i, row in enumerate(rows):
        if i in invalid:
            result = {**row, "error": f"invalid: {invalid[i]}"}
        else:
            result = run_row(row, common, out / "rows" / f"{i:02d}", args.row_timeout)
        results.append(result)
        print(f"{label(row)}: " + json.dumps({k: v for k, v in result.items() if k not in row}), flush=True)
    loader = []
    if args.loader or args.loader_only:
        workers = [int(w) for w in args.workers.split(",") if w]
        loader = bench_loader(workers, args.img, 16, args.loader_batches, args.data)
        meta["loader_setup"] = (
            f"Data loader: {args.img} px, batch 16, mosaic + affine + HSV + flip, {os.cpu_count()} CPUs"
        )
    text = report(results, loader, meta, cuda)
    (out / "bench.md").write_text(text)
    (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": results, "loader": loader}, indent=2))
    files = [out / "bench.md", out / "bench.json"]
    picture = plot(results, out / "bench.png")
    files += [picture] if picture else []
    if not args.no_mlflow:
        log_to_mlflow(out, results, loader, meta, files)
    print("\n" + text + f"written to {out}/")
    return 0


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("deepspeed", "accelerate"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            pass
    return ", ".join(found)


if __name__ == "__main__":
    sys.exit(main())
