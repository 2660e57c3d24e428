"""The networks compared side by side: what `launch/compare.py` runs.

Each network (the YOLOv5-Face baseline and the GD variants) trains with the same run config, data and
recipe, once per seed (`train.seed`: initialisation, data order, augmentation; the synthetic data itself
stays the same), each run a `launch/train.py` process of its own in `<out>/<network>-seed<seed>/`. With
`transfer`, a GD network then trains once more from the baseline's `best.pt` of the first seed
(`train.init_weights`: its backbone), so its per-epoch AP can be read against its run from scratch.

Finished runs are kept (each gets `compare_done.json`, the command it ran): run again, the command trains
only what is missing (an interrupted run is resumed) and always rewrites the report from the runs' `best.pt`
and `results.csv`:

* accuracy: `best.pt` of each run evaluated on the config's validation split, WIDER-style AP easy /
  medium / hard by face size, AP on the smallest faces (`ap_tiny`) and, where the data has attribute
  files, on the blurred, occluded, dark, atypically posed and crowded faces (`adyolo.eval.subsets`);
* cost: parameters and GFLOPs at the training size, training images/s and peak memory (the median and
  the largest over the run's epochs, from results.csv), and the eval forward's images/s (timed here);
* `compare.md` (per network the mean and spread over seeds, then every run, then the transfer curve) and
  `compare.json` (every number) in `<out>`.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from adyolo.bench.inference import bench_inference
from adyolo.config import load_run_config
from adyolo.data.dataset import FaceDataset, build_loader, list_images
from adyolo.data.synthetic import ensure_synthetic_dataset
from adyolo.eval.evaluator import face_counts, predict, score
from adyolo.eval.subsets import score_subsets
from adyolo.model.summary import summarize
from adyolo.weights import load_weights

# Network name -> the overrides that make it.
NETWORKS: dict[str, list[str]] = {
    "yolov5face": ["model.neck=yolov5face"],
    "efficient": ["model.neck=gd", "model.fusion=efficient"],
    "full": ["model.neck=gd", "model.fusion=full", "model.attention=sdpa"],
}
BASELINE = "yolov5face"
ACCURACY = ("ap_easy", "ap_medium", "ap_hard", "ap_tiny")
EVAL_CONF = 0.02  # training validation's threshold: AP sees the whole precision-recall curve
INFERENCE_BATCH, INFERENCE_STEPS, INFERENCE_WARMUP = 8, 10, 2
DONE_FILE = "compare_done.json"  # written into a run's folder when its training process ended well


@dataclass
class RunResult:
    network: str
    seed: int
    folder: str
    init_weights: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # ap_* of best.pt
    faces: dict[str, int] = field(default_factory=dict)  # faces counted per setting / subset
    best_epoch: int = 0
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, val ap_hard) from results.csv
    parameters: int = 0
    gflops: float = 0.0
    train_images_per_s: float = math.nan
    peak_memory_gib: float = math.nan
    train_time_s: float = math.nan


def run_comparison(
    config: str,
    out: Path,
    networks: list[str],
    seeds: list[int],
    transfer: str | None,
    overrides: list[str],
    train_only: bool = False,
) -> dict:
    """Train what is missing, then evaluate every run and write compare.md / compare.json; returns the
    report's data."""
    out.mkdir(parents=True, exist_ok=True)
    plan = [(network, seed, None) for seed in seeds for network in networks]  # every network before a second seed
    if transfer is not None:
        pretrained = out / run_name(BASELINE, seeds[0]) / "best.pt"
        plan.append((transfer, seeds[0], pretrained))
    for network, seed, init in plan:
        if init is not None and not init.is_file():
            train(config, out, BASELINE, seeds[0], None, overrides)
        train(config, out, network, seed, init, overrides)
    if train_only:
        return {}
    results = [evaluate_run(config, out, network, seed, init, overrides) for network, seed, init in plan]
    speed = inference_speed(config, networks, overrides)
    report = {
        "config": config,
        "overrides": overrides,
        "seeds": seeds,
        "runs": [asdict(r) for r in results],
        "inference_images_per_s": speed,
    }
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    (out / "compare.md").write_text(format_report(results, speed, seeds, config, overrides))
    print((out / "compare.md").read_text())
    return report


def run_name(network: str, seed: int, init: Path | None = None) -> str:
    return f"{network}-seed{seed}" + (f"-from-{BASELINE}" if init is not None else "")


def train(config: str, out: Path, network: str, seed: int, init: Path | None, overrides: list[str]) -> None:
    """One training run in its own process, unless it finished before; an interrupted one is resumed."""
    folder = out / run_name(network, seed, init)
    done = folder / DONE_FILE
    if done.is_file():
        return
    command = [sys.executable, str(Path(__file__).parents[1] / "launch" / "train.py"), "--config", config]
    command += [*overrides, *NETWORKS[network], f"train.seed={seed}", f"output_dir={folder}"]
    if init is not None:
        command.append(f"train.init_weights={init}")
    command.append("--resume" if (folder / "checkpoints").is_dir() else "--exist-ok")
    print(f"[compare] {' '.join(command)}", flush=True)
    code = subprocess.call(command)
    if code != 0:
        raise RuntimeError(f"training {folder} failed with exit code {code}; rerun the command to resume it")
    done.write_text(json.dumps({"command": command}, indent=2))


def evaluate_run(config: str, out: Path, network: str, seed: int, init: Path | None, overrides: list[str]) -> RunResult:
    """best.pt of one run on the config's validation split: AP by size and by subset; cost from results.csv."""
    folder = out / run_name(network, seed, init)
    model, saved = load_weights(folder / "best.pt")
    cfg = load_run_config(config, [*overrides, *NETWORKS[network]])
    val = _val_images(cfg)
    img_size = saved["model"]["img_size"]
    loader = build_loader(FaceDataset(val, img_size), 8, False, 0, seed=0)
    predictions = predict(model, loader, torch.device("cpu"), conf_threshold=EVAL_CONF)
    metrics, _ = score(predictions)
    subsets, subset_faces = score_subsets(predictions)
    rows = _results(folder / "results.csv")
    summary = summarize(model, img_size)
    evaluated = [(int(r["epoch"]), float(r["ap_hard"])) for r in rows if r.get("ap_hard") not in (None, "")]
    return RunResult(
        network=network,
        seed=seed,
        folder=str(folder),
        init_weights=str(init) if init is not None else None,
        metrics={**metrics, **subsets},
        faces={**face_counts(predictions), **subset_faces},
        best_epoch=max(evaluated, key=lambda e: e[1])[0] if evaluated else 0,
        curve=evaluated,
        parameters=summary.parameters,
        gflops=summary.gflops,
        train_images_per_s=statistics.median(_numbers(rows, "images_per_s")) if rows else math.nan,
        peak_memory_gib=max(_numbers(rows, "peak_memory_gib"), default=math.nan),
        train_time_s=float(rows[-1]["time_s"]) if rows else math.nan,
    )


def inference_speed(config: str, networks: list[str], overrides: list[str]) -> dict[str, float]:
    """Eval-forward images/s of each network at the training size (fp32, batch 8, median step)."""
    img = load_run_config(config, overrides).model.img_size
    rows = bench_inference(
        [(n, [*overrides, *NETWORKS[n]]) for n in networks],
        config,
        img,
        INFERENCE_BATCH,
        INFERENCE_STEPS,
        INFERENCE_WARMUP,
    )
    return {row["model"]: row["images_per_s"] for row in rows}


def epochs_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first epoch whose AP reaches `target`, or None."""
    return next((epoch for epoch, ap in curve if ap >= target), None)


# ---------------------------------------------------------------------------------------------------
# The report


def format_report(results: list[RunResult], speed: dict[str, float], seeds: list[int], config: str, overrides) -> str:
    scratch = [r for r in results if r.init_weights is None]
    networks = list(dict.fromkeys(r.network for r in scratch))
    subsets = [k for k in scratch[0].metrics if k.startswith("ap_") and k not in (*ACCURACY, "ap_map50")]
    lines = [
        f"Config `{config}`{' with ' + ' '.join(overrides) if overrides else ''}; seeds {', '.join(map(str, seeds))}; "
        "AP of each run's best.pt on the validation split (WIDER protocol; easy / medium / hard by face size: "
        "smaller side >= 32 / >= 16 / any px; tiny: < 8 px). Mean over seeds, +/- half the range.",
        "",
        "| network | AP easy | AP medium | AP hard | AP tiny (<8 px) | params (M) | GFLOPs | train img/s | "
        "eval img/s | peak memory (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for network in networks:
        runs = [r for r in scratch if r.network == network]
        cells = [_mean_spread([r.metrics[k] for r in runs]) for k in ACCURACY]
        cost = [
            f"{runs[0].parameters / 1e6:.2f}",
            f"{runs[0].gflops:.2f}",
            f"{statistics.mean(r.train_images_per_s for r in runs):.2f}",
            f"{speed.get(network, math.nan):.1f}",
            f"{max(r.peak_memory_gib for r in runs):.2f}",
        ]
        lines.append(f"| {network} | " + " | ".join(cells + cost) + " |")
    if subsets:
        lines += ["", "AP on the faces each attribute marks (mean over seeds, +/- half the range):", ""]
        lines.append("| network | " + " | ".join(s.removeprefix("ap_").replace("_", " ") for s in subsets) + " |")
        lines.append("|---" * (len(subsets) + 1) + "|")
        for network in networks:
            runs = [r for r in scratch if r.network == network]
            lines.append(
                f"| {network} | " + " | ".join(_mean_spread([r.metrics[s] for r in runs]) for s in subsets) + " |"
            )
        counts = scratch[0].faces
        lines += [
            "",
            "Faces counted: "
            + ", ".join(f"{k} {counts[k]}" for k in ("easy", "medium", "hard", *[s[3:] for s in subsets], "tiny")),
        ]
    lines += ["", "Every run:", "", "| run | AP easy | AP medium | AP hard | AP tiny | best epoch | train time |"]
    lines.append("|---|---|---|---|---|---|---|")
    for r in results:
        cells = [f"{r.metrics[k]:.4f}" for k in ACCURACY]
        lines.append(
            f"| {Path(r.folder).name} | " + " | ".join(cells) + f" | {r.best_epoch} | {r.train_time_s / 60:.0f} min |"
        )
    transferred = [r for r in results if r.init_weights is not None]
    for run in transferred:
        base = next(r for r in scratch if r.network == run.network and r.seed == run.seed)
        target = max(ap for _, ap in base.curve)
        reached = epochs_to_reach(run.curve, target)
        lines += [
            "",
            f"Transfer: {run.network} initialised from {Path(run.init_weights).parent.name}/best.pt against "
            f"the same network from scratch (seed {run.seed}), val AP hard per epoch:",
            "",
            "| epoch | " + " | ".join(str(e) for e, _ in base.curve) + " |",
            "|---" * (len(base.curve) + 1) + "|",
            "| from scratch | " + " | ".join(f"{ap:.3f}" for _, ap in base.curve) + " |",
            "| from the baseline | " + " | ".join(f"{ap:.3f}" for _, ap in run.curve) + " |",
            "",
            f"From scratch the best hard AP is {target:.4f} (epoch {base.best_epoch} of {base.curve[-1][0]}); "
            + (
                f"initialised from the baseline the run reaches it at epoch {reached}."
                if reached is not None
                else f"initialised from the baseline it does not reach it in {run.curve[-1][0]} epochs "
                f"(its best: {max(ap for _, ap in run.curve):.4f})."
            ),
        ]
    return "\n".join(lines) + "\n"


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} +/- {(max(values) - min(values)) / 2:.4f}"


def _val_images(cfg) -> list[Path]:
    if cfg.data.val is not None:
        return list_images(cfg.data.val)
    return list_images(ensure_synthetic_dataset(cfg.data.synthetic_root, cfg.data.synthetic)["val"])


def _results(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _numbers(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "", "nan")]
