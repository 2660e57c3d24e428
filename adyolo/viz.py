"""Pictures for people: detections drawn on images, validation pictures that show misses,
precision-recall curves and the per-epoch / per-rank plots of a training run."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torchvision.ops import box_iou

from adyolo.layout import NUM_LANDMARKS, DetectionRow

# Left eye, right eye, nose, left mouth corner, right mouth corner (BGR).
POINT_COLOURS = [(0, 0, 255), (0, 255, 0), (255, 0, 0), (0, 255, 255), (255, 0, 255)]
DETECTION_COLOUR = (0, 200, 0)
# Validation pictures: found faces, missed faces, right and wrong detections in four colours (BGR).
FOUND_COLOUR = (255, 255, 255)
MISSED_COLOUR = (0, 0, 255)
FALSE_COLOUR = (0, 165, 255)
VALIDATION_LONG_SIDE = 960  # small validation images are enlarged to this, so a 10 px face is 40+ px
MATCH_IOU = 0.5  # a detection finds a face at this IoU, as the AP counts it
PIXELS_PER_LINE_WIDTH = 400  # lines grow one pixel thicker per this many pixels of the longer side
FONT_SCALE_PER_LINE_WIDTH = 0.35


def draw_detections(image: np.ndarray, detections: np.ndarray) -> np.ndarray:
    """BGR image + [K, 16] detections (`DetectionRow`) -> a copy with boxes, scores and landmarks drawn."""
    canvas = image.copy()
    thickness = max(1, round(max(image.shape[:2]) / PIXELS_PER_LINE_WIDTH))
    for det in detections:
        _draw_detection(canvas, det, DETECTION_COLOUR, thickness)
    return canvas


def match_faces(
    detections: np.ndarray, truth_xywh: np.ndarray, iou: float = MATCH_IOU
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching by descending score at IoU `iou`, as the AP does (the AP adds WIDER's +1 pixel to box
    sizes; the two differ only at the threshold). detections [K, 16] (`DetectionRow`), faces [N, 4] (x y w h)
    -> (found [N] bool: a detection matched the face, correct [K] bool: the detection matched a face no
    higher-scoring detection had taken)."""
    found = np.zeros(len(truth_xywh), dtype=bool)
    correct = np.zeros(len(detections), dtype=bool)
    if len(detections) and len(truth_xywh):
        truth = torch.as_tensor(truth_xywh, dtype=torch.float64)
        boxes = torch.as_tensor(detections[:, DetectionRow.BOX], dtype=torch.float64)
        overlaps = box_iou(boxes, torch.cat([truth[:, :2], truth[:, :2] + truth[:, 2:]], 1)).numpy()
        for k in np.argsort(-detections[:, DetectionRow.SCORE], kind="stable"):
            candidates = np.where(found, -1.0, overlaps[k])
            best = int(np.argmax(candidates))
            if candidates[best] >= iou:
                found[best] = correct[k] = True
    return found, correct


def draw_validation(image: np.ndarray, detections: np.ndarray, truth_xywh: np.ndarray) -> np.ndarray:
    """A validation picture a person can read misses from: the image enlarged to `VALIDATION_LONG_SIDE`
    (if smaller), faces that were found in white and missed ones in red, correct detections in green and
    false ones in orange (with score and landmarks), and a legend line with the counts.

    image: BGR [H, W, 3]; detections [K, 16] (`DetectionRow`, those to show); truth_xywh [N, 4]."""
    scale = max(1.0, VALIDATION_LONG_SIDE / max(image.shape[:2]))
    canvas = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR) if scale > 1 else image.copy()
    found, correct = match_faces(detections, truth_xywh)
    thickness = max(1, round(max(canvas.shape[:2]) / PIXELS_PER_LINE_WIDTH))
    for (x, y, w, h), hit in zip(np.asarray(truth_xywh, dtype=np.float64) * scale, found):
        colour = FOUND_COLOUR if hit else MISSED_COLOUR
        cv2.rectangle(canvas, (int(x), int(y)), (int(x + w), int(y + h)), colour, thickness)
    shown = detections.copy()
    shown[:, DetectionRow.BOX] *= scale
    shown[:, DetectionRow.LANDMARKS] *= scale
    for det, right in zip(shown, correct):
        _draw_detection(canvas, det, DETECTION_COLOUR if right else FALSE_COLOUR, thickness)
    legend = (
        f"faces {len(found)}: found {int(found.sum())} (white), missed {int((~found).sum())} (red) | "
        f"detections {len(correct)}: correct {int(correct.sum())} (green), false {int((~correct).sum())} (orange)"
    )
    # The legend's font as large as fits the picture's width.
    font = cv2.FONT_HERSHEY_SIMPLEX
    width = cv2.getTextSize(legend, font, 1.0, 1)[0][0]
    scale = min(0.4 * thickness, (canvas.shape[1] - 8) / width)
    height = cv2.getTextSize(legend, font, scale, 1)[0][1]
    bar = np.zeros((height + 12, canvas.shape[1], 3), dtype=np.uint8)
    cv2.putText(bar, legend, (4, height + 5), font, scale, FOUND_COLOUR, 1, cv2.LINE_AA)
    return np.concatenate([bar, canvas], axis=0)


def _draw_detection(canvas: np.ndarray, det: np.ndarray, colour: tuple[int, int, int], thickness: int) -> None:
    x1, y1, x2, y2 = det[DetectionRow.BOX]
    cv2.rectangle(canvas, (int(x1), int(y1)), (int(x2), int(y2)), colour, thickness)
    cv2.putText(
        canvas,
        f"{det[DetectionRow.SCORE]:.2f}",
        (int(x1), max(10, int(y1) - 3)),  # above the box, but inside the picture
        cv2.FONT_HERSHEY_SIMPLEX,
        FONT_SCALE_PER_LINE_WIDTH * thickness,
        colour,
        thickness,
    )
    for point_colour, (px, py) in zip(POINT_COLOURS, det[DetectionRow.LANDMARKS].reshape(NUM_LANDMARKS, 2)):
        cv2.circle(canvas, (int(px), int(py)), thickness + 1, point_colour, -1)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    return plt


def plot_results(rows: Sequence[Mapping[str, float]], path: str | Path) -> Path:
    """The per-epoch results table (`results.csv` rows) as one picture: training losses, validation AP
    and the peak memory of the fullest rank, against epoch."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=100)
    epochs = [r["epoch"] for r in rows]
    for key in (k for k in rows[0] if k.startswith("loss_")) if rows else ():
        axes[0].plot(epochs, [r.get(key, math.nan) for r in rows], label=key[5:])
    axes[0].set(title="training loss (epoch mean)", xlabel="epoch")
    for key in ("ap_easy", "ap_medium", "ap_hard", "map50"):
        points = [(r["epoch"], r[key]) for r in rows if _number(r.get(key))]
        if points:
            axes[1].plot(*zip(*points), marker="o", label=key)
    axes[1].set(title="validation", xlabel="epoch", ylim=(0, 1.02))
    memory = [(r["epoch"], r["peak_memory_gib"]) for r in rows if _number(r.get("peak_memory_gib"))]
    if memory:
        axes[2].plot(*zip(*memory), marker=".")
    axes[2].set(title="peak memory of the fullest rank (GiB)", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path)
    finally:  # also when the disk is full: an open figure is kept by pyplot
        plt.close(fig)
    return Path(path)


def plot_memory_by_rank(series: Mapping[str, Mapping[int, Sequence[tuple[int, float]]]], path: str | Path) -> Path:
    """One panel per memory kind, one line per rank: {kind: {rank: [(step, GiB), ...]}} -> PNG."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 3.6), dpi=100, squeeze=False)
    for ax, (kind, ranks) in zip(axes[0], series.items()):
        for rank, points in sorted(ranks.items()):
            if points:
                ax.plot(*zip(*points), label=f"rank {rank}", linewidth=1)
        ax.set(title=f"memory: {kind}", xlabel="optimizer step", ylabel="GiB")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    try:
        fig.savefig(path)
    finally:  # also when the disk is full: an open figure is kept by pyplot
        plt.close(fig)
    return Path(path)


def _number(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def plot_pr_curves(curves: Mapping[str, object], path: str | Path) -> Path:
    """Precision-recall curves ({setting: PRCurve}) to a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    for name, curve in curves.items():
        ax.plot(curve.recall, curve.precision, label=f"{name} (AP {curve.ap:.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="WIDER-style PR curves")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    try:
        fig.savefig(path)
    finally:  # also when the disk is full: an open figure is kept by pyplot
        plt.close(fig)
    return Path(path)
