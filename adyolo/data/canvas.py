"""What both synthetic presets draw on: a cluttered background, skin tones, and the geometry of placing
faces. The default preset's images depend on every number here: changing them changes its files."""

from __future__ import annotations

import math

import cv2
import numpy as np

SKIN_TONES_BGR = np.array(
    [[181, 209, 241], [150, 190, 225], [120, 165, 210], [95, 135, 185], [70, 105, 150], [50, 75, 110]],
    np.float32,
)


def background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth two-colour gradient with random clutter (rectangles, circles, lines) and noise."""
    a, b = rng.uniform(0, 255, (2, 3))
    t = np.linspace(0, 1, width if rng.random() < 0.5 else height, dtype=np.float32)
    ramp = a + (b - a) * t[:, None]
    image = (
        np.broadcast_to(ramp[None] if len(t) == width else ramp[:, None], (height, width, 3)).astype(np.uint8).copy()
    )
    for _ in range(int(rng.integers(4, 14))):
        colour = tuple(int(c) for c in rng.uniform(0, 255, 3))
        x, y = int(rng.uniform(0, width)), int(rng.uniform(0, height))
        size = int(rng.uniform(4, max(width, height) / 4))
        kind = rng.integers(3)
        if kind == 0:
            cv2.rectangle(image, (x, y), (x + size, y + int(size * rng.uniform(0.3, 2))), colour, -1)
        elif kind == 1:
            cv2.circle(image, (x, y), size // 2, colour, -1, cv2.LINE_AA)
        else:
            end = (int(rng.uniform(0, width)), int(rng.uniform(0, height)))
            cv2.line(image, (x, y), end, colour, int(rng.integers(1, 4)), cv2.LINE_AA)
    noise = rng.normal(0, rng.uniform(2, 10), image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def rotated_half_extent(a: float, b: float, angle_deg: float) -> np.ndarray:
    """Half width and height of the axis-aligned box around an ellipse with semi-axes a, b rotated by angle."""
    t = math.radians(angle_deg)
    return np.array([math.hypot(a * math.cos(t), b * math.sin(t)), math.hypot(a * math.sin(t), b * math.cos(t))])


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over the smaller box's area."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller
