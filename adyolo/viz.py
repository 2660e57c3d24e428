"""Pictures for people: detections drawn on images, and precision-recall curves."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np

from adyolo.layout import NUM_LANDMARKS, DetectionRow

# Left eye, right eye, nose, left mouth corner, right mouth corner (BGR).
POINT_COLOURS = [(0, 0, 255), (0, 255, 0), (255, 0, 0), (0, 255, 255), (255, 0, 255)]
TRUTH_COLOUR = (255, 255, 255)
DETECTION_COLOUR = (0, 200, 0)
PIXELS_PER_LINE_WIDTH = 400  # lines grow one pixel thicker per this many pixels of the longer side
FONT_SCALE_PER_LINE_WIDTH = 0.35


def draw_detections(image: np.ndarray, detections: np.ndarray, truth_xywh: np.ndarray | None = None) -> np.ndarray:
    """BGR image + [K, 16] detections (`DetectionRow`) -> a copy with boxes, scores and landmarks drawn;
    ground-truth boxes [N, 4] (x y w h), if given, in white."""
    canvas = image.copy()
    thickness = max(1, round(max(image.shape[:2]) / PIXELS_PER_LINE_WIDTH))
    for x, y, w, h in truth_xywh if truth_xywh is not None else []:
        cv2.rectangle(canvas, (int(x), int(y)), (int(x + w), int(y + h)), TRUTH_COLOUR, thickness)
    for det in detections:
        x1, y1, x2, y2 = det[DetectionRow.BOX]
        cv2.rectangle(canvas, (int(x1), int(y1)), (int(x2), int(y2)), DETECTION_COLOUR, thickness)
        cv2.putText(
            canvas,
            f"{det[DetectionRow.SCORE]:.2f}",
            (int(x1), max(10, int(y1) - 3)),  # above the box, but inside the picture
            cv2.FONT_HERSHEY_SIMPLEX,
            FONT_SCALE_PER_LINE_WIDTH * thickness,
            DETECTION_COLOUR,
            thickness,
        )
        for colour, (px, py) in zip(POINT_COLOURS, det[DetectionRow.LANDMARKS].reshape(NUM_LANDMARKS, 2)):
            cv2.circle(canvas, (int(px), int(py)), thickness + 1, colour, -1)
    return canvas


def plot_pr_curves(curves: Mapping[str, object], path: str | Path) -> Path:
    """Precision-recall curves ({setting: PRCurve}) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    for name, curve in curves.items():
        ax.plot(curve.recall, curve.precision, label=f"{name} (AP {curve.ap:.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="WIDER-style PR curves")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
