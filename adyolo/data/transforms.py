"""Augmentations with OpenCV/NumPy that move boxes and landmarks together with the pixels.

Every function takes a BGR uint8 image [H, W, 3] and its `Faces` (pixels) and returns both
transformed. Randomness comes from the `np.random.Generator` passed in, so a sample is
reproducible from its seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from adyolo.data.faces import FLIP_ORDER, Faces
from adyolo.schema import ConfigError

PAD_VALUE = 114  # YOLO's grey, for letterbox borders and the mosaic canvas


@dataclass
class AugmentConfig:
    mosaic: float = 1.0
    """Probability of building a training sample from 4 images."""
    close_mosaic: int = 0
    """Train the last this many epochs without mosaic (YOLOX, YOLOv8): the final epochs see whole
    letterboxed images, as validation does."""
    degrees: float = 0.0
    """Rotation range (+/- degrees)."""
    translate: float = 0.1
    """Translation range (+/- fraction of the image size)."""
    scale: float = 0.5
    """Scale range (1 +/- scale)."""
    shear: float = 0.0
    """Shear range (+/- degrees)."""
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    """HSV gains (fractions)."""
    fliplr: float = 0.5
    """Probability of a horizontal flip (left/right landmarks are swapped)."""

    def __post_init__(self) -> None:
        for key in ("mosaic", "fliplr"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(key, f"{getattr(self, key)} is a probability; use a value in [0, 1]")
        if self.close_mosaic < 0:
            raise ConfigError("close_mosaic", f"{self.close_mosaic} must be 0 or more (epochs)")
        for key in ("degrees", "translate", "scale", "shear", "hsv_h", "hsv_s", "hsv_v"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"{getattr(self, key)} must not be negative")
        if self.scale >= 1.0:
            raise ConfigError("scale", f"{self.scale} must be below 1 (the scale range is 1 +/- scale)")


def resize_long_side(image: np.ndarray, faces: Faces, size: int) -> tuple[np.ndarray, Faces]:
    """Resize so that the longer side is `size`, keeping the aspect ratio."""
    h, w = image.shape[:2]
    ratio = size / max(h, w)
    if ratio == 1:
        return image, faces
    interp = cv2.INTER_AREA if ratio < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (max(1, round(w * ratio)), max(1, round(h * ratio))), interpolation=interp)
    return resized, faces.transformed((resized.shape[1] / w, resized.shape[0] / h), (0, 0))


def letterbox(image: np.ndarray, faces: Faces, size: int) -> tuple[np.ndarray, Faces, tuple[float, float, float]]:
    """Resize the longer side to `size` and pad to size x size, centred.

    Returns the image, the faces, and (ratio, pad_x, pad_y) to map predictions back:
    original = (letterboxed - pad) / ratio.
    """
    h0, w0 = image.shape[:2]
    image, faces = resize_long_side(image, faces, size)
    h, w = image.shape[:2]
    pad_x, pad_y = (size - w) / 2, (size - h) / 2
    left, top = int(round(pad_x - 0.1)), int(round(pad_y - 0.1))
    image = cv2.copyMakeBorder(
        image, top, size - h - top, left, size - w - left, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3
    )
    return image, faces.transformed(1.0, (left, top)), (w / w0, float(left), float(top))


def horizontal_flip(image: np.ndarray, faces: Faces) -> tuple[np.ndarray, Faces]:
    """Mirror left-right; the left eye / mouth corner become the right ones."""
    w = image.shape[1]
    boxes = faces.boxes.copy()
    boxes[:, [0, 2]] = w - faces.boxes[:, [2, 0]]
    points = faces.points[:, FLIP_ORDER].copy()
    points[..., 0] = w - points[..., 0]
    return np.ascontiguousarray(image[:, ::-1]), Faces(faces.classes.copy(), boxes, points)


def hsv_jitter(image: np.ndarray, rng: np.random.Generator, h_gain: float, s_gain: float, v_gain: float) -> np.ndarray:
    """Random hue/saturation/value gains through lookup tables (YOLOv5's augment_hsv)."""
    if not (h_gain or s_gain or v_gain):
        return image
    gains = rng.uniform(-1, 1, 3) * [h_gain, s_gain, v_gain] + 1
    hue, sat, val = cv2.split(cv2.cvtColor(image, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.float32)
    lut_hue = ((x * gains[0]) % 180).astype(np.uint8)
    lut_sat = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_val = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    merged = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
    return cv2.cvtColor(merged, cv2.COLOR_HSV2BGR)


def random_affine(
    image: np.ndarray,
    faces: Faces,
    rng: np.random.Generator,
    cfg: AugmentConfig,
    out_size: tuple[int, int],
    centre: tuple[float, float] | None = None,
) -> tuple[np.ndarray, Faces]:
    """Rotate, scale, shear and translate about `centre` (default: the image centre) into an
    `out_size` (w, h) image whose centre that point becomes. Boxes are the bounds of their
    transformed corners; faces that shrink to slivers or mostly leave the image are dropped."""
    h, w = image.shape[:2]
    out_w, out_h = out_size
    cx, cy = centre if centre is not None else (w / 2, h / 2)
    to_origin = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], np.float64)
    angle = rng.uniform(-cfg.degrees, cfg.degrees)
    scale = rng.uniform(1 - cfg.scale, 1 + cfg.scale)
    rotate = np.eye(3)
    rotate[:2] = cv2.getRotationMatrix2D((0, 0), angle, scale)
    shear = np.eye(3)
    shear[0, 1] = math.tan(math.radians(rng.uniform(-cfg.shear, cfg.shear)))
    shear[1, 0] = math.tan(math.radians(rng.uniform(-cfg.shear, cfg.shear)))
    to_output = np.eye(3)
    to_output[0, 2] = rng.uniform(0.5 - cfg.translate, 0.5 + cfg.translate) * out_w
    to_output[1, 2] = rng.uniform(0.5 - cfg.translate, 0.5 + cfg.translate) * out_h
    matrix = to_output @ shear @ rotate @ to_origin
    warped = cv2.warpAffine(image, matrix[:2], (out_w, out_h), borderValue=(PAD_VALUE,) * 3)
    return warped, _warp_faces(faces, matrix, out_w, out_h, scale)


def _warp_faces(faces: Faces, matrix: np.ndarray, width: int, height: int, scale: float) -> Faces:
    if not len(faces):
        return faces
    x1, y1, x2, y2 = faces.boxes.T
    corners = np.stack([np.stack([x1, y1], 1), np.stack([x2, y1], 1), np.stack([x1, y2], 1), np.stack([x2, y2], 1)], 1)
    corners = corners @ matrix[:2, :2].T + matrix[:2, 2]
    boxes = np.concatenate([corners.min(1), corners.max(1)], 1).astype(np.float32)
    points = (faces.points @ matrix[:2, :2].T + matrix[:2, 2]).astype(np.float32)
    moved = Faces(faces.classes.copy(), boxes, points)
    # Keep faces that kept at least 2 px per side, 10% of their (scaled) area and a sane aspect ratio.
    keep = _keep_mask(moved.boxes, width, height, faces.boxes, scale)
    return moved.select(keep).clipped(width, height, min_size=2.0)


def _keep_mask(boxes: np.ndarray, width: int, height: int, before: np.ndarray, scale: float) -> np.ndarray:
    clipped = boxes.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, width)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, height)
    w, h = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    w0, h0 = (before[:, 2] - before[:, 0]) * scale, (before[:, 3] - before[:, 1]) * scale
    aspect = np.maximum(w / (h + 1e-9), h / (w + 1e-9))
    return (w > 2) & (h > 2) & (w * h / (w0 * h0 + 1e-9) > 0.1) & (aspect < 20)


def mosaic(
    tiles: list[tuple[np.ndarray, Faces]], rng: np.random.Generator, cfg: AugmentConfig, size: int
) -> tuple[np.ndarray, Faces]:
    """Four images (each already resized to long side `size`) around a random centre of a
    2size x 2size canvas, then a random affine that crops the result to size x size."""
    canvas = np.full((2 * size, 2 * size, 3), PAD_VALUE, np.uint8)
    xc, yc = (int(rng.uniform(size * 0.5, size * 1.5)) for _ in range(2))
    placed = []
    for i, (image, faces) in enumerate(tiles):
        h, w = image.shape[:2]
        # Each tile touches the centre from one quadrant: top-left, top-right, bottom-left, bottom-right.
        if i == 0:
            x1, y1, x2, y2 = max(xc - w, 0), max(yc - h, 0), xc, yc
            sx1, sy1 = w - (x2 - x1), h - (y2 - y1)
        elif i == 1:
            x1, y1, x2, y2 = xc, max(yc - h, 0), min(xc + w, 2 * size), yc
            sx1, sy1 = 0, h - (y2 - y1)
        elif i == 2:
            x1, y1, x2, y2 = max(xc - w, 0), yc, xc, min(yc + h, 2 * size)
            sx1, sy1 = w - (x2 - x1), 0
        else:
            x1, y1, x2, y2 = xc, yc, min(xc + w, 2 * size), min(yc + h, 2 * size)
            sx1, sy1 = 0, 0
        canvas[y1:y2, x1:x2] = image[sy1 : sy1 + (y2 - y1), sx1 : sx1 + (x2 - x1)]
        placed.append(faces.transformed(1.0, (x1 - sx1, y1 - sy1)))
    faces = Faces.concat(placed).clipped(2 * size, 2 * size)
    return random_affine(canvas, faces, rng, cfg, (size, size), centre=(size, size))
