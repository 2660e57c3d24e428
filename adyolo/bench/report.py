"""The benchmark's reports: bench.md (tables and the checks of the targets), bench.png, and MLflow."""

from __future__ import annotations

from pathlib import Path

from adyolo.bench.grid import label
from adyolo.bench.profile import TABLE_FILE, profile_table
from adyolo.tracking import Tracker, tracking_uri

GPU_SIZES_GIB = (16, 24, 40, 80, 141)  # the GPUs a row can be said to fit
# What a process holds on a GPU beyond PyTorch's reserved memory (CUDA context, kernels): about 1 GiB.
CUDA_CONTEXT_GIB = 1.0
# The targets the benchmark checks (docs/benchmark.md): full/sdpa within 1.3x the memory and at least
# 0.75x the speed of efficient, full with checkpointing on a 16 GiB GPU, the fastest row 2.5x fp32
# eager explicit attention.
MAX_MEMORY_RATIO = 1.3
MIN_SPEED_RATIO = 0.75
TARGET_GPU_GIB = 16
MIN_SPEEDUP_OVER_EXPLICIT = 2.5


def fits(row: dict) -> str:
    """The smallest common GPU that holds the row's peak reserved memory plus the CUDA context."""
    need = row["peak_reserved_gib"] + CUDA_CONTEXT_GIB
    sizes = [s for s in GPU_SIZES_GIB if s >= need]
    return f"{sizes[0]} GiB" if sizes else f"> {GPU_SIZES_GIB[-1]} GiB"


def model_table(rows: list[dict], cuda: bool) -> str:
    """The rows side by side. "predicted" is the memory plan's per-rank figure for the row (GPU: allocated;
    CPU: peak RSS, the tensors plus the process's measured non-tensor memory, and in brackets the private
    writable memory a per-process limit counts), made before its steps, so an OOM row shows it too;
    "measured / predicted" compares it with the largest rank."""
    ran = [r for r in rows if "images_per_s" in r]
    ref = ran[0] if ran else None
    memory = "peak alloc GiB per rank | peak reserved GiB (max)" if cuda else "peak RSS GiB per rank | (same)"
    lines = [
        f"| configuration | micro x ranks x accum | {memory} | predicted GiB | measured / predicted | img/s | "
        "TFLOP/s | img/s vs first | memory vs first | fits |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = label(r)
        key = "predicted_allocated_gib" if cuda else "predicted_peak_gib"
        predicted = f"{r[key]:.2f}" if key in r else "-"
        if not cuda and "predicted_budget_use_gib" in r:  # what a per-process memory limit counts
            predicted += f" (private {r['predicted_budget_use_gib']:.2f})"
        if "images_per_s" not in r:
            reason = f"OOM (rank {r['oom_rank']}): {r['oom']}" if "oom" in r else r["error"]
            lines.append(f"| {name} | | {reason} | | {predicted} | | - | - | - | - | {'no' if 'oom' in r else '-'} |")
            continue
        per_rank = " / ".join(f"{x['peak_allocated_gib']:.2f}" for x in r["ranks"])
        split = f"{r.get('micro_batches', r['micro_batch'])} x {r['world_size']} x {r['accumulation']}"
        tflops = r["images_per_s"] * r["train_gflops_per_image"] / 1e3
        ratio = f"{r['peak_allocated_gib'] / r[key]:.2f}" if key in r else "-"
        lines.append(
            f"| {name} | {split} | {per_rank} | {r['peak_reserved_gib']:.2f} | {predicted} | {ratio} | "
            f"{r['images_per_s']:.1f} | {tflops:.3g} | {r['images_per_s'] / ref['images_per_s']:.2f}x | "
            f"{r['peak_allocated_gib'] / ref['peak_allocated_gib']:.2f}x | {fits(r) if cuda else '-'} |"
        )
    return "\n".join(lines) + "\n"


def per_flop_table(rows: list[dict]) -> str:
    """Useful work per second, as YOLO papers count it: forward GFLOPs per image at the bench size (2 x
    multiply-adds) x images/s, per distinct model of the rows that ran, and relative to the first."""
    ran = [r for r in rows if "images_per_s" in r]
    if not ran:
        return ""
    ref = ran[0]["images_per_s"] * ran[0]["gflops_per_image"]
    lines = [
        "| configuration | params (M) | GFLOPs (forward) | img/s | img/s x GFLOPs | vs first |",
        "|---|---|---|---|---|---|",
    ]
    for r in ran:
        work = r["images_per_s"] * r["gflops_per_image"]
        lines.append(
            f"| {label(r)} | {r['params_m']:.2f} | {r['gflops_per_image']:.1f} | {r['images_per_s']:.2f} | "
            f"{work:.1f} | {work / ref:.2f}x |"
        )
    return "\n".join(lines)


def rank_table(rows: list[dict]) -> str:
    """Rows of several ranks: each rank's median step and (with `--profile`) its time in collectives."""
    multi = [r for r in rows if "images_per_s" in r and r["world_size"] > 1]
    if not multi:
        return ""
    lines = ["| configuration | rank | ms/step | collectives ms/step | collectives share |", "|---|---|---|---|---|"]
    for r in multi:
        for rank, x in enumerate(r["ranks"]):
            comm = x.get("comm_ms_per_step")
            shown = (f"{comm:.0f}", f"{100 * comm / x['ms_per_step']:.0f}%") if comm is not None else ("-", "-")
            lines.append(f"| {label(r)} | {rank} | {x['ms_per_step']:.0f} | {shown[0]} | {shown[1]} |")
    return "\n".join(lines)


def loader_table(rows: list[dict]) -> str:
    lines = ["| loader workers | images in RAM (data.cache) | images/s |", "|---|---|---|"]
    cells = [f"| {r['workers']} | {'yes' if r.get('cache') else 'no'} | {r['images_per_s']:.0f} |" for r in rows]
    return "\n".join(lines + cells) + "\n"


def _same_but(row: dict, other: dict, *keys: str) -> bool:
    settings = ("global_batch", "precision", "checkpoint", "zero", "channels_last", "compile", "bucket", "overlap_comm")
    return all(row.get(k) == other.get(k) for k in settings if k not in keys)


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
            f"full/sdpa peak memory <= {MAX_MEMORY_RATIO}x efficient: {ratio:.2f}x ({label(full)}) - "
            f"{verdict(ratio <= MAX_MEMORY_RATIO)}"
        )
        full, eff = max(pairs, key=lambda p: p[0]["images_per_s"] / p[1]["images_per_s"])
        ratio = full["images_per_s"] / eff["images_per_s"]
        checks.append(
            f"full/sdpa img/s >= 0.75x efficient: {ratio:.2f}x ({label(full)}) - {verdict(ratio >= MIN_SPEED_RATIO)}"
        )
    else:
        checks.append("full/sdpa vs efficient: no bf16 pair with the same settings measured")
    ckpt = [r for r in sdpa if r["checkpoint"] != "off"]
    if ckpt:
        best = min(ckpt, key=lambda r: r["peak_reserved_gib"])
        within = budget_gib == TARGET_GPU_GIB or best["peak_reserved_gib"] + CUDA_CONTEXT_GIB <= TARGET_GPU_GIB
        how = "run under a 16 GiB budget" if budget_gib == TARGET_GPU_GIB else "peak reserved + 1 GiB context"
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
            f"({label(fastest)}) - {verdict(ratio >= MIN_SPEEDUP_OVER_EXPLICIT)}"
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


def inference_table(rows: list[dict]) -> str:
    lines = ["| model | BatchNorms folded | img/s | img/s folded | folded / plain |", "|---|---|---|---|---|"]
    for r in rows:
        plain, folded = r["images_per_s"], r["folded_images_per_s"]
        lines.append(f"| {r['model']} | {r['folded']} | {plain:.1f} | {folded:.1f} | {folded / plain:.2f}x |")
    return "\n".join(lines)


def report(rows: list[dict], loader: list[dict], meta: dict, cuda: bool, inference: list[dict] = ()) -> str:
    # Without training rows (--loader-only, --inference-only) the step settings describe nothing measured.
    text = [f"# Benchmark, {meta['date']}", "", meta["setup"] if rows else meta["machine"], ""]
    if rows:
        text += [model_table(rows, cuda), ""]
        per_flop = per_flop_table(rows)
        text += ["Speed per FLOP:", "", per_flop, ""] if per_flop else []
        per_rank = rank_table(rows)
        note = " (collectives: `--profile`, start to end, waiting for the slowest rank included)"
        text += [f"Time per rank{note}:", "", per_rank, ""] if per_rank else []
    if loader:
        text += [meta["loader_setup"], "", loader_table(loader), ""]
    if inference:
        text += [meta["inference_setup"], "", inference_table(inference), ""]
    if rows:
        text += ["Targets:", ""] + [f"- {c}" for c in target_checks(rows, loader, meta["memory_budget_gib"])]
    profiled = profile_table(rows, label)
    if profiled:
        unit = "device" if cuda else "CPU"
        text += ["", f"Where the time goes (`--profile`: self {unit} time per optimizer step, top operators):", ""]
        text += [profiled]
    return "\n".join(text) + "\n"


def log_to_mlflow(
    out: Path, rows: list[dict], loader: list[dict], meta: dict, files: list[Path], inference: list[dict] = ()
) -> None:
    tracker = Tracker(True, tracking_uri(None, out), "adyolo-bench", out, run_name=f"bench {meta['date']}")
    sentences = ("machine", "setup", "loader_setup", "inference_setup")  # in bench.md, not parameters
    tracker.log_params({k: v for k, v in meta.items() if k not in sentences})
    metrics = {}
    for r in rows:
        name = label(r).replace("=", "-").replace("+", "_")
        if "images_per_s" in r:
            metrics[f"{name}/images_per_s"] = r["images_per_s"]
            metrics[f"{name}/tflops"] = r["images_per_s"] * r["train_gflops_per_image"] / 1e3
            for rank, mem in enumerate(r["ranks"]):
                metrics[f"{name}/rank{rank}/peak_allocated_gib"] = mem["peak_allocated_gib"]
                metrics[f"{name}/rank{rank}/peak_reserved_gib"] = mem["peak_reserved_gib"]
                metrics[f"{name}/rank{rank}/ms_per_step"] = mem["ms_per_step"]
                if "comm_ms_per_step" in mem:
                    metrics[f"{name}/rank{rank}/comm_ms_per_step"] = mem["comm_ms_per_step"]
        else:
            metrics[f"{name}/oom"] = float("oom" in r)
    for r in loader:
        metrics[f"loader/workers{r['workers']}{'/cache' if r.get('cache') else ''}/images_per_s"] = r["images_per_s"]
    for r in inference:
        metrics[f"inference/{r['model']}/images_per_s"] = r["images_per_s"]
        metrics[f"inference/{r['model']}/folded_images_per_s"] = r["folded_images_per_s"]
    tracker.log_metrics(metrics, step=0)
    for path in files:
        tracker.log_artifact(path)
    for r in rows:  # each profiled row's trace and table, in a folder named for the row
        if r.get("trace"):
            folder = f"profile/{label(r).replace('=', '-').replace('+', '_').replace(' ', '_')}"
            for path in (Path(r["trace"]), Path(r["trace"]).with_name(TABLE_FILE)):
                tracker.log_artifact(path, folder)
    tracker.finish()
