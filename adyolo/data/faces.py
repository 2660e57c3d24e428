"""`Faces`: the annotations of one image in pixels, as the augmentations move them around."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adyolo.layout import MISSING_COORD, NUM_LANDMARKS, LabelRow

NUM_POINTS = NUM_LANDMARKS
# Horizontal flip turns the left eye into the right one and the left mouth corner into the right one.
FLIP_ORDER = [1, 0, 2, 4, 3]


@dataclass
class Faces:
    classes: np.ndarray  # [N] int64
    boxes: np.ndarray  # [N, 4] float32: x1, y1, x2, y2 in pixels
    points: np.ndarray  # [N, 5, 2] float32: x, y in pixels; NaN where the landmark is missing

    @classmethod
    def empty(cls) -> Faces:
        return cls(np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros((0, NUM_POINTS, 2), np.float32))

    @classmethod
    def from_labels(cls, labels: np.ndarray, width: int, height: int) -> Faces:
        """Normalised label rows [N, 15] (see adyolo.data.labels) -> pixels."""
        labels = np.asarray(labels, np.float32).reshape(-1, LabelRow.COLUMNS)
        scale = np.array([width, height], np.float32)
        centre, size = labels[:, LabelRow.CENTRE] * scale, labels[:, LabelRow.SIZE] * scale
        points = labels[:, LabelRow.LANDMARKS].reshape(-1, NUM_POINTS, 2) * scale
        # A point is missing when either coordinate is negative (-1 in the file).
        missing = (labels[:, LabelRow.LANDMARKS].reshape(-1, NUM_POINTS, 2) < 0).any(axis=-1)
        points[missing] = np.nan
        boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
        return cls(labels[:, LabelRow.CLASS].astype(np.int64), boxes, points)

    def __len__(self) -> int:
        return len(self.classes)

    def select(self, keep: np.ndarray) -> Faces:
        return Faces(self.classes[keep], self.boxes[keep], self.points[keep])

    @staticmethod
    def concat(items: list[Faces]) -> Faces:
        if not items:
            return Faces.empty()
        return Faces(
            np.concatenate([f.classes for f in items]),
            np.concatenate([f.boxes for f in items]),
            np.concatenate([f.points for f in items]),
        )

    def transformed(self, scale: float | tuple[float, float], offset: tuple[float, float]) -> Faces:
        """x' = x * scale + offset, for boxes and points (per axis if `scale` is a pair)."""
        sx, sy = (scale, scale) if np.isscalar(scale) else scale
        factor = np.array([sx, sy], np.float32)
        shift = np.array(offset, np.float32)
        boxes = (self.boxes.reshape(-1, 2, 2) * factor + shift).reshape(-1, 4)
        return Faces(self.classes.copy(), boxes.astype(np.float32), (self.points * factor + shift).astype(np.float32))

    def clipped(self, width: int, height: int, min_size: float = 2.0) -> Faces:
        """Clip boxes to the image and drop faces narrower or shorter than `min_size` pixels.

        Landmarks that leave the image become missing (both coordinates), as in YOLOv5-Face.
        """
        boxes = self.boxes.copy()
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
        points = self.points.copy()
        outside = (points[..., 0] < 0) | (points[..., 0] > width) | (points[..., 1] < 0) | (points[..., 1] > height)
        points[outside] = np.nan
        keep = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
        return Faces(self.classes[keep], boxes[keep], points[keep])

    def to_targets(self) -> np.ndarray:
        """[N, 15] float32 `LabelRow` in pixels: class, cx, cy, w, h, 5 x (x, y); -1 for missing points."""
        centre = (self.boxes[:, :2] + self.boxes[:, 2:]) / 2
        size = self.boxes[:, 2:] - self.boxes[:, :2]
        points = np.nan_to_num(self.points.reshape(-1, 2 * NUM_POINTS), nan=MISSING_COORD)
        return np.concatenate([self.classes[:, None].astype(np.float32), centre, size, points], axis=1).astype(
            np.float32
        )
