"""What a run tells its user beyond the per-step metrics, written by the main process only.

- `results.csv` (one row per epoch: losses, learning rate, speed, validation metrics, peak memory of the
  fullest rank, wall time) and `results.png` drawn from it, rewritten and logged at every epoch end;
  the rows of a job before a resume are kept.
- Every evaluation's pictures in `pictures/epoch_NNN/` (logged under `evaluations/epoch_NNN/`): the PR
  curves and the same few validation images each time (the first by path, so epochs can be compared),
  drawn so misses show (`adyolo.viz.draw_validation`).
- At an improvement, `best/*` metrics (and `best/epoch`) against the epoch.
- At the end: `best/` and `last/` artifact folders holding the pictures of the weights `best.pt` and
  `last.pt` hold (both logged under `weights/`), `memory_by_rank.png` (a line per rank for each memory
  kind, from the run's own metric history, so a resumed run plots all of it), the run's description,
  and the summary printed in the terminal.

None of these files is needed to resume: one that cannot be written (a disk that filled after the
checkpoint) is warned about once and training goes on; the next checkpoint, which every rank agrees
on, stops the run (exit 74) if the disk stays full. The table is rewritten whole each time, so the
rows of a failed write are in the next one.

The per-rank chart is an artifact rather than child runs per rank: one job stays one MLflow run (its
params, tags and artifacts in one place), and the UI's charts already put `memory/<kind>/rank<r>` side
by side in one section per kind.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from adyolo.engine.memory import LOGGED, headline_kind
from adyolo.layout import DetectionRow
from adyolo.tracking import Tracker, rounded
from adyolo.viz import draw_validation, plot_memory_by_rank, plot_pr_curves, plot_results

PICTURE_MIN_SCORE = 0.25  # detections drawn on the validation pictures (detect.py's default too)
METRIC_ORDER = ("ap_easy", "ap_medium", "ap_hard", "map50")
PLOT_EVERY_S = 60.0  # between evaluations, results.png is redrawn at most this often


class RunReport:
    """`device_type`: "cuda" or "cpu" (which memory kinds exist); `world_size`: ranks; `fitness`: the
    metric that picks best.pt; `num_images`: validation pictures per evaluation; `ui_command`: how to open
    the MLflow UI on this run's store; `description`: what ran (Markdown), the run's description that
    `finish` completes with the result."""

    def __init__(
        self,
        tracker: Tracker,
        output_dir: str | Path,
        device_type: str,
        world_size: int,
        fitness: str,
        num_images: int,
        ui_command: str,
        description: str = "",
    ):
        self.tracker = tracker
        self.output_dir = Path(output_dir)
        self.device_type = device_type
        self.world_size = world_size
        self.fitness = fitness
        self.num_images = num_images
        self.ui_command = ui_command
        self.description = description
        self.results_path = self.output_dir / "results.csv"
        self.rows = read_results(self.results_path)
        self._start = time.monotonic()
        self._time_before = self.rows[-1]["time_s"] if self.rows else 0.0  # a resumed job goes on counting
        self._epoch_losses: dict[str, float] = {}
        self._epoch_steps = 0
        self._epoch_images_per_s: list[float] = []
        self._epoch_metrics: dict[str, float] = {}
        self._lr = math.nan
        self._plotted_at = -math.inf  # time.monotonic() of the last results.png
        self._write_warned = False
        self.last_evaluated: tuple[int, dict[str, float]] | None = None

    # ------------------------------------------------------------------------------------------
    def add_step(self, losses: Mapping[str, float | torch.Tensor], lr: float, images_per_s: float) -> None:
        """One optimizer step's mean losses, the learning rate and the global speed. Losses may be 0-d
        device tensors: they are summed there (in float64) and read once, at the epoch's end."""
        for key, value in losses.items():
            value = value.double() if isinstance(value, torch.Tensor) else value
            self._epoch_losses[key] = self._epoch_losses.get(key, 0.0) + value
        self._epoch_steps += 1
        self._epoch_images_per_s.append(images_per_s)
        self._lr = lr

    def evaluation(
        self,
        epoch: int,
        metrics: Mapping[str, float],
        improved: bool,
        predictions: Sequence[tuple[str, np.ndarray, np.ndarray]],
        curves: Mapping[str, object],
    ) -> None:
        """An evaluation of the EMA weights after `epoch` (1-based): metrics, and its pictures."""
        self._epoch_metrics = dict(metrics)
        self.last_evaluated = (epoch, dict(metrics))
        self.tracker.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step=epoch)
        if improved:
            self.tracker.log_metrics({"best/epoch": epoch, **{f"best/{k}": v for k, v in metrics.items()}}, step=epoch)
        folder = self.pictures(epoch)
        with self._written(f"the pictures of epoch {epoch}"):
            folder.mkdir(parents=True, exist_ok=True)
            plot_pr_curves(curves, folder / "pr_curve.png")
            for path, dets, truth in sorted(predictions, key=lambda p: p[0])[: self.num_images]:
                image = cv2.imread(path)
                if image is not None:
                    shown = dets[dets[:, DetectionRow.SCORE] > PICTURE_MIN_SCORE]
                    picture = folder / f"val_{Path(path).stem}.jpg"
                    if not cv2.imwrite(str(picture), draw_validation(image, shown, truth)):
                        raise OSError(f"OpenCV could not write {picture}")
        self.tracker.log_artifacts(folder, f"evaluations/{folder.name}")

    def pictures(self, epoch: int) -> Path:
        return self.output_dir / "pictures" / f"epoch_{epoch:03d}"

    def epoch_end(self, epoch: int, step: int, peak_memory_gib: float) -> None:
        """Close epoch `epoch` (1-based): its results row and the table, logged; the plot too after an
        evaluation, or when it is `PLOT_EVERY_S` old (drawing it costs about 0.4 s: 4 % of an epoch of
        the embedded default, which evaluates every 5th)."""
        steps = max(self._epoch_steps, 1)
        row: dict[str, float] = {"epoch": epoch, "step": step, "time_s": round(self.elapsed_s(), 1)}
        row.update({f"loss_{k}": rounded(float(v) / steps) for k, v in self._epoch_losses.items()})
        row["lr"] = rounded(self._lr)
        speeds = self._epoch_images_per_s
        row["images_per_s"] = rounded(float(np.median(speeds))) if speeds else math.nan
        row.update({k: rounded(self._epoch_metrics[k]) if k in self._epoch_metrics else math.nan for k in METRIC_ORDER})
        row["peak_memory_gib"] = rounded(peak_memory_gib)
        self.rows = [r for r in self.rows if r["epoch"] != epoch] + [row]  # a resumed epoch replaces its row
        with self._written(self.results_path.name):
            write_results(self.results_path, self.rows)
            self.tracker.log_artifact(self.results_path)
        if self._epoch_metrics or time.monotonic() - self._plotted_at >= PLOT_EVERY_S:
            with self._written("results.png"):
                plot_results(self.rows, self.output_dir / "results.png")
                self.tracker.log_artifact(self.output_dir / "results.png")
            self._plotted_at = time.monotonic()
        self._epoch_losses, self._epoch_steps, self._epoch_images_per_s, self._epoch_metrics = {}, 0, [], {}

    def elapsed_s(self) -> float:
        return self._time_before + time.monotonic() - self._start

    @contextlib.contextmanager
    def _written(self, what: str):
        """Files of the report are not needed to resume: one that cannot be written costs itself, with a
        warning the first time."""
        try:
            yield
        except OSError as err:
            if not self._write_warned:
                self._write_warned = True
                free = shutil.disk_usage(self.output_dir).free if self.output_dir.exists() else 0
                print(
                    f"warning: could not write {what} in {self.output_dir} ({err.strerror or err}; {free / 2**20:.0f} "
                    "MiB free); training goes on, and stops at the next checkpoint if the disk stays full",
                    file=sys.stderr,
                    flush=True,
                )

    # ------------------------------------------------------------------------------------------
    def finish(
        self, best_epoch: int, best_fitness: float, weights: Mapping[str, Path], times: str | None = None
    ) -> str:
        """Log the weights, the best and last pictures and the per-rank memory plot; set the run's
        description; return the end-of-run summary for the terminal (with `times`, this job's time per
        phase, under the first line)."""
        for path in weights.values():
            if path.exists():
                self.tracker.log_artifact(path, "weights")
        best_row = next((r for r in self.rows if r["epoch"] == best_epoch), None)
        if self.last_evaluated is None:  # a resumed job that did not evaluate: the table knows the last one
            evaluated = [r for r in self.rows if not math.isnan(r.get("ap_hard", math.nan))]
            if evaluated:
                self.last_evaluated = (evaluated[-1]["epoch"], evaluated[-1])
        if best_epoch and self.pictures(best_epoch).is_dir():
            self.tracker.log_artifacts(self.pictures(best_epoch), "best")
        if self.last_evaluated and self.pictures(self.last_evaluated[0]).is_dir():
            self.tracker.log_artifacts(self.pictures(self.last_evaluated[0]), "last")
        peaks = self._memory_by_rank()
        lines = [f"trained in {_duration(self.elapsed_s())}: {self.rows[-1]['epoch'] if self.rows else 0} epochs"]
        if times:
            lines.append(times)
        if best_row is not None:
            lines.append(f"best  epoch {best_epoch:>3}: {_metrics_text(best_row)}  -> {weights['best']}")
        elif weights["best"].exists():  # resumed from a checkpoint that did not record the epoch
            lines.append(f"best: {self.fitness} {best_fitness:.4f}  -> {weights['best']}")
        else:
            lines.append("best: no evaluation yet; no best.pt")
        if self.last_evaluated is not None:
            epoch, metrics = self.last_evaluated
            lines.append(f"last  epoch {epoch:>3}: {_metrics_text(metrics)}  -> {weights['last']}")
        if peaks:
            kind = headline_kind(self.device_type)
            per_rank = ", ".join(f"rank{r} {v:.2f}" for r, v in peaks.items())
            lines.append(f"peak {kind[5:-4]} per rank (GiB): {per_rank}")
        lines.append(
            f"results: {self.results_path} (+ results.png), pictures: {self.output_dir / 'pictures'} "
            f"(best: epoch_{best_epoch:03d})"
        )
        lines.append(f"MLflow: {self.ui_command}")
        summary = "\n".join(lines)
        self.tracker.describe(f"{self.description}\n\n**Result**\n\n```\n{summary}\n```")
        return summary

    def _memory_by_rank(self) -> dict[int, float]:
        """Plot every memory kind's per-rank history; return the headline kind's peak per rank."""
        kinds = LOGGED["cuda" if self.device_type == "cuda" else "cpu"]
        series = {
            kind: {rank: self.tracker.history(f"memory/{kind}/rank{rank}") for rank in range(self.world_size)}
            for kind in kinds
        }
        series = {k: v for k, v in series.items() if any(v.values())}
        if not series:
            return {}
        with self._written("memory_by_rank.png"):
            self.tracker.log_artifact(plot_memory_by_rank(series, self.output_dir / "memory_by_rank.png"))
        headline = series.get(headline_kind(self.device_type), {})
        return {rank: max(v for _, v in points) for rank, points in headline.items() if points}


def read_results(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with path.open(newline="") as file:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(file)]


def write_results(path: Path, rows: Sequence[Mapping[str, float]]) -> None:
    """The table through a temporary file and a rename: a kill never leaves half a CSV."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", newline="") as file:
            writer = csv.DictWriter(file, columns, restval="")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    except OSError:
        tmp.unlink(missing_ok=True)  # the table before stays as it was
        raise
    os.replace(tmp, path)


def _parse(text: str) -> float:
    if text == "":
        return math.nan
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def _metrics_text(values: Mapping[str, float]) -> str:
    return " ".join(f"{k} {values[k]:.4f}" for k in METRIC_ORDER if k in values and not math.isnan(values[k]))


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"
