"""Memory and speed of the detector's variants, measured side by side in one run.

    python launch/bench.py                                   # CPU: size s, 1 image at 640 px, fp32
    python launch/bench.py --batch 40 --precision bf16       # one GPU: the batch-40 question
    python launch/bench.py --variants full/sdpa,efficient --checkpoint on --memory-budget-gib 16

For every (variant, checkpointing) pair it times a forward and backward pass of the model in
train mode on random images (median over the timed steps, after warm-up; CUDA-synchronised) and
records peak memory: `torch.cuda.max_memory_allocated` / `max_memory_reserved` on GPU, peak
process RSS on CPU. Each pair runs in a fresh subprocess, so an out-of-memory error is a result
("OOM"), not a crash, and one row's allocations cannot leak into the next. Ratios are against the
first row that ran (memory: peak allocated on GPU, RSS growth during the steps on CPU). The
objective is the mean square of the head outputs: this measures the network, not the detection
loss or the optimizer.

With --loader it measures the training data loader instead: images/s per worker count, with the
full training augmentation (mosaic, affine, HSV, flip), on the synthetic default or --data.

    python launch/bench.py --loader --workers 0,1,2,4 --img 640

Writes bench.md and bench.json to --out (default runs/bench/<date>).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from adyolo.data.config import DataConfig
from adyolo.data.dataset import FaceDataset, build_loader, list_images
from adyolo.data.synthetic import ensure_synthetic_dataset
from adyolo.model import build_model
from adyolo.model.summary import count_gflops, count_parameters

VARIANTS = {
    "full/sdpa": {"fusion": "full", "attention": "sdpa"},
    "full/explicit": {"fusion": "full", "attention": "explicit"},
    "efficient": {"fusion": "efficient"},
}
GIB = 2**30


def measure(row: dict) -> dict:
    """Run one configuration in this process; returns timings and memory (or the OOM message)."""
    device = torch.device(row["device"])
    cuda = device.type == "cuda"
    if cuda and row["memory_budget_gib"]:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, row["memory_budget_gib"] * GIB / total), device)
    torch.manual_seed(0)
    model_cfg = {"size": row["size"], "img_size": row["img"], **VARIANTS[row["variant"]]}
    if row["checkpoint"]:
        model_cfg["checkpoint"] = ["all"]
    model = build_model(model_cfg)
    result = {"params_m": count_parameters(model) / 1e6, "gflops_per_image": count_gflops(model, row["img"])}
    memory_format = torch.channels_last if row["channels_last"] else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).train()
    images = torch.randn(row["batch"], 3, row["img"], row["img"], device=device).to(memory_format=memory_format)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=row["precision"] == "bf16")

    def step() -> None:
        with autocast:
            outputs = model(images)
        loss = sum(o.float().square().mean() for o in outputs)
        loss.backward()
        model.zero_grad(set_to_none=True)

    rss_before = _peak_rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    try:
        for i in range(row["warmup"] + row["steps"]):
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize(device)
            if i >= row["warmup"]:
                times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError as err:
        return {**result, "oom": str(err).split("\n")[0][:160]}
    seconds = statistics.median(times)
    result.update(ms_per_step=1000 * seconds, images_per_s=row["batch"] / seconds)
    if cuda:
        result.update(
            peak_allocated_gib=torch.cuda.max_memory_allocated(device) / GIB,
            peak_reserved_gib=torch.cuda.max_memory_reserved(device) / GIB,
        )
    else:
        result.update(peak_rss_gib=_peak_rss_bytes() / GIB, rss_growth_gib=(_peak_rss_bytes() - rss_before) / GIB)
    return result


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_row(row: dict) -> dict:
    """`measure` in a fresh interpreter; a killed process is reported, not raised."""
    proc = subprocess.run([sys.executable, __file__, "--measure", json.dumps(row)], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {**row, "error": f"exit {proc.returncode}: {tail[:160]}"}
    return {**row, **json.loads(lines[-1])}


def table(rows: list[dict], device_name: str) -> str:
    cuda = rows[0]["device"].startswith("cuda")
    mem_label = "peak alloc GiB | peak reserved GiB" if cuda else "peak RSS GiB | RSS growth GiB"
    mem_keys = ("peak_allocated_gib", "peak_reserved_gib") if cuda else ("peak_rss_gib", "rss_growth_gib")
    # What the step itself needs: on CPU the absolute RSS is mostly the interpreter and libraries.
    ratio_key = mem_keys[0] if cuda else mem_keys[1]
    ran = [r for r in rows if "ms_per_step" in r]
    ref = ran[0] if ran else None
    lines = [
        f"| variant | checkpointing | {mem_label} | ms/step | img/s | img/s vs first | memory vs first |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ckpt = "on" if r["checkpoint"] else "off"
        if "ms_per_step" in r:
            mem = f"{r[mem_keys[0]]:.2f} | {r[mem_keys[1]]:.2f}"
            lines.append(
                f"| {r['variant']} | {ckpt} | {mem} | {r['ms_per_step']:.0f} | {r['images_per_s']:.2f} | "
                f"{r['images_per_s'] / ref['images_per_s']:.2f}x | {r[ratio_key] / ref[ratio_key]:.2f}x |"
            )
        else:
            reason = f"OOM: {r['oom']}" if "oom" in r else r["error"]
            lines.append(f"| {r['variant']} | {ckpt} | {reason} | - | - | - | - | - |")
    header = (
        f"{device_name}; torch {torch.__version__}; size {rows[0]['size']}, batch {rows[0]['batch']}, "
        f"{rows[0]['img']} px, {rows[0]['precision']}"
        f"{', channels_last' if rows[0]['channels_last'] else ''}; median of {rows[0]['steps']} steps after "
        f"{rows[0]['warmup']} warm-up; {dt.date.today().isoformat()}"
    )
    return header + "\n\n" + "\n".join(lines) + "\n"


def bench_loader(workers: list[int], img: int, batch: int, batches: int, data: str | None) -> tuple[str, list[dict]]:
    """Images/s of the augmented training loader for each worker count (after one warm-up batch)."""
    cfg = DataConfig()
    source = data or ensure_synthetic_dataset(cfg.synthetic_root, cfg.synthetic)["train"]
    dataset = FaceDataset(list_images(source), img, cfg.augment)
    rows = []
    for num_workers in workers:
        loader = iter(build_loader(dataset, batch, shuffle=True, workers=num_workers, seed=0))
        next(loader)  # worker start-up is not throughput
        start, images = time.perf_counter(), 0
        for _ in range(batches):
            images += len(next(loader)["images"])
        rows.append({"workers": num_workers, "images_per_s": images / (time.perf_counter() - start)})
        del loader
    header = (
        f"Data loader, {len(dataset)} images from {source}, {img} px, batch {batch}, mosaic + affine + HSV + flip; "
        f"{os.cpu_count()} CPUs; {dt.date.today().isoformat()}"
    )
    lines = ["| workers | images/s |", "|---|---|"] + [f"| {r['workers']} | {r['images_per_s']:.0f} |" for r in rows]
    return header + "\n\n" + "\n".join(lines) + "\n", rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one row, JSON in and out
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", default="s", choices=["n", "s", "m"])
    parser.add_argument("--batch", type=int, help="images per step (default: 40 on GPU, 1 on CPU)")
    parser.add_argument("--img", type=int, default=640, help="square image size, a multiple of 32")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--checkpoint", default="off,on", help="comma list of off, on (checkpoint every block)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--memory-budget-gib", type=float, default=0.0, help="emulate a smaller GPU (0: whole GPU)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, help="folder for bench.md and bench.json")
    parser.add_argument("--loader", action="store_true", help="measure the data loader instead of the model")
    parser.add_argument("--workers", default="0,2,4", help="--loader: comma list of worker counts")
    parser.add_argument("--batches", type=int, default=20, help="--loader: timed batches per worker count")
    parser.add_argument("--data", help="--loader: image folder or list (default: the synthetic dataset)")
    args = parser.parse_args()

    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return
    out = args.out or Path("runs/bench") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if args.loader:
        workers = [int(w) for w in args.workers.split(",") if w]
        report, rows = bench_loader(workers, args.img, args.batch or 16, args.batches, args.data)
        _write(out, report, {"loader": rows})
        return

    cuda = args.device.startswith("cuda")
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    checkpoints = [c for c in args.checkpoint.split(",") if c]
    if any(c not in ("off", "on") for c in checkpoints):
        parser.error("--checkpoint takes a comma list of off and on")
    if args.img % 32:
        parser.error(f"--img {args.img} is not a multiple of 32")
    base = {
        "device": args.device,
        "size": args.size,
        "batch": args.batch or (40 if cuda else 1),
        "img": args.img,
        "precision": args.precision or ("bf16" if cuda else "fp32"),
        "channels_last": args.channels_last,
        "memory_budget_gib": args.memory_budget_gib,
        "warmup": args.warmup,
        "steps": args.steps,
    }
    device_name = (
        torch.cuda.get_device_name(args.device)
        if cuda
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    if cuda and args.memory_budget_gib:
        device_name += f" limited to {args.memory_budget_gib:g} GiB"
    rows = []
    for variant in variants:
        for ckpt in checkpoints:
            row = run_row({**base, "variant": variant, "checkpoint": ckpt == "on"})
            rows.append(row)
            print(json.dumps(row), flush=True)
    _write(out, table(rows, device_name), {"device": device_name, "rows": rows})


def _write(out: Path, report: str, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(report)
    (out / "bench.json").write_text(json.dumps(data, indent=2))
    print("\n" + report + f"\nwritten to {out}/bench.md")


if __name__ == "__main__":
    main()
