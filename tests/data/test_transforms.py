"""Boxes and landmarks stay on the pixels they describe through every augmentation."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from adyolo.data.faces import FLIP_ORDER, Faces
from adyolo.data.transforms import AugmentConfig, horizontal_flip, hsv_jitter, letterbox, mosaic, random_affine

# One colour per landmark slot (BGR), far apart so interpolation cannot confuse them.
COLOURS = np.array([[0, 0, 255], [0, 255, 0], [255, 0, 0], [0, 255, 255], [255, 0, 255]], np.uint8)


def painted(width=200, height=150, seed=0):
    """A grey image with two faces whose landmarks are painted in their slot's colour."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 40, np.uint8)
    boxes = np.array([[20, 20, 90, 110], [110, 30, 180, 130]], np.float32) + rng.uniform(-10, 10, (2, 1))
    # Face-like layout (eyes, nose, mouth corners), far enough apart that the discs never touch.
    layout = np.array([[0.25, 0.3], [0.75, 0.3], [0.5, 0.55], [0.3, 0.8], [0.7, 0.8]], np.float32)
    points = np.zeros((2, 5, 2), np.float32)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        points[i] = [x1, y1] + layout * [x2 - x1, y2 - y1]
        for k, (x, y) in enumerate(points[i]):
            cv2.circle(image, (int(round(x)), int(round(y))), 4, COLOURS[k].tolist(), -1)
    return image, Faces(np.zeros(2, np.int64), boxes, points)


def assert_landmarks_on_colours(image, faces, slots=range(5)):
    checked = 0
    for face in faces.points:
        for k, (x, y) in zip(slots, face):
            if np.isnan(x):
                continue
            pixel = image[int(round(y)), int(round(x))].astype(int)
            assert np.abs(pixel - COLOURS[k]).max() < 80, (k, pixel)
            checked += 1
    assert checked > 0


def test_letterbox_keeps_alignment_and_reports_the_mapping():
    image, faces = painted()
    out, moved, (ratio, pad_x, pad_y) = letterbox(image, faces, 320)
    assert out.shape == (320, 320, 3)
    assert ratio == pytest.approx(320 / 200) and pad_x == 0 and pad_y == pytest.approx((320 - 240) / 2, abs=1)
    assert_landmarks_on_colours(out, moved)
    np.testing.assert_allclose(
        (moved.boxes.reshape(-1, 2) - [pad_x, pad_y]) / ratio, faces.boxes.reshape(-1, 2), atol=1e-4
    )


def test_flip_mirrors_and_swaps_left_and_right():
    image, faces = painted()
    out, flipped = horizontal_flip(image, faces)
    # Slot k now holds the mirrored partner's point: its colour is that of slot FLIP_ORDER[k].
    assert_landmarks_on_colours(out, flipped, slots=FLIP_ORDER)
    np.testing.assert_allclose(flipped.points[:, 0], [200, 0] + faces.points[:, 1] * [-1, 1])
    np.testing.assert_allclose(flipped.boxes[:, [0, 2]], 200 - faces.boxes[:, [2, 0]])
    twice = horizontal_flip(out, flipped)[1]
    np.testing.assert_allclose(twice.points, faces.points, atol=1e-4)


def test_random_affine_moves_points_with_pixels():
    image, faces = painted()
    cfg = AugmentConfig(degrees=25, translate=0.1, scale=0.3, shear=5)
    for seed in range(5):
        out, moved = random_affine(image, faces, np.random.default_rng(seed), cfg, (256, 256))
        assert out.shape == (256, 256, 3)
        assert_landmarks_on_colours(out, moved)
        inside = moved.points[~np.isnan(moved.points[..., 0])]
        assert (inside >= 0).all() and (inside[:, 0] <= 256).all() and (inside[:, 1] <= 256).all()
        # Every kept landmark lies inside its (axis-aligned, transformed) box.
        for box, points in zip(moved.boxes, moved.points):
            visible = points[~np.isnan(points[:, 0])]
            assert ((visible >= box[:2] - 1) & (visible <= box[2:] + 1)).all()


def test_mosaic_keeps_alignment():
    tiles = [painted(seed=s) for s in range(4)]
    out, faces = mosaic(tiles, np.random.default_rng(3), AugmentConfig(scale=0.2), 256)
    assert out.shape == (256, 256, 3)
    assert len(faces) > 0
    assert_landmarks_on_colours(out, faces)


def test_hsv_jitter_changes_colours_not_geometry():
    image, _ = painted()
    out = hsv_jitter(image, np.random.default_rng(0), 0.015, 0.7, 0.4)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(out, image)
    # The painted discs stay where they were: background stays uniform around them.
    assert len(np.unique(out[0, :10].reshape(-1, 3), axis=0)) == 1


def test_points_leaving_the_image_become_missing_together():
    image, faces = painted()
    shifted = faces.transformed(1.0, (-60.0, 0.0)).clipped(200, 150)
    first = shifted.points[0]
    assert np.isnan(first).any()
    assert (np.isnan(first[:, 0]) == np.isnan(first[:, 1])).all()
