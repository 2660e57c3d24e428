"""Target assignment on hand-worked toy targets."""

from __future__ import annotations

from dataclasses import fields

import torch

from adyolo.loss.assigner import LevelTargets, assign
from adyolo.model.config import DEFAULT_ANCHORS

ANCHORS = torch.tensor(DEFAULT_ANCHORS, dtype=torch.float32).view(4, 3, 2)
STRIDES = torch.tensor([4.0, 8.0, 16.0, 32.0])
GRIDS = [(16, 16), (8, 8), (4, 4), (2, 2)]  # a 64 x 64 image


def face(cx, cy, w, h, image=0, points=None):
    points = points if points is not None else [cx - 2, cy - 2, cx + 2, cy - 2, cx, cy, cx - 2, cy + 2, cx + 2, cy + 2]
    return torch.tensor([[image, 0, cx, cy, w, h, *points]], dtype=torch.float32)


def assigned(levels):
    """The rows of each level that are assignments (`valid`); the others are masked candidates."""
    return [LevelTargets(**{f.name: getattr(lv, f.name)[lv.valid] for f in fields(lv)}) for lv in levels]


def pairs(level):
    return sorted(zip(level.anchor.tolist(), level.cell_x.tolist(), level.cell_y.tolist()))


def test_anchors_and_cells_of_a_10px_face():
    levels = assigned(assign(face(21, 31, 10, 10), ANCHORS, STRIDES, GRIDS, anchor_t=4.0))
    # Stride 4: centre (5.25, 7.75) in cell (5, 7); x is near the left edge -> cell (4, 7) too,
    # y near the bottom edge -> cell (5, 8). Size 2.5 cells fits all three P2 anchors
    # (1.5x1.75, 2.25x2.75, 3.25x4 cells: every ratio below 4).
    assert pairs(levels[0]) == sorted((a, x, y) for a in range(3) for x, y in [(5, 7), (4, 7), (5, 8)])
    # Stride 8: centre (2.625, 3.875): near the right edge -> (3, 3), near the bottom -> (2, 4).
    # Size 1.25 cells: anchors 2.25x2.875 and 3.25x4.125 fit, 4.625x5.875 does not (5.875 / 1.25 > 4).
    assert pairs(levels[1]) == sorted((a, x, y) for a in range(2) for x, y in [(2, 3), (3, 3), (2, 4)])
    # Strides 16 and 32: the smallest anchor there is 54 px wide, over 4x the face.
    assert len(levels[2].image) == 0 and len(levels[3].image) == 0


def test_regression_targets_are_relative_to_the_cell():
    level = assigned(assign(face(21, 31, 10, 10), ANCHORS, STRIDES, GRIDS, anchor_t=4.0))[0]
    centre = (level.cell_x == 5) & (level.cell_y == 7) & (level.anchor == 0)
    torch.testing.assert_close(level.box[centre][0], torch.tensor([0.25, 0.75, 2.5, 2.5]))
    torch.testing.assert_close(level.anchor_wh[centre][0], torch.tensor([1.5, 1.75]))
    # Nose at (21, 31) px -> (5.25, 7.75) cells -> (0.25, 0.75) from the corner of cell (5, 7).
    torch.testing.assert_close(level.landmarks[centre][0, 4:6], torch.tensor([0.25, 0.75]))
    left = (level.cell_x == 4) & (level.cell_y == 7) & (level.anchor == 0)
    torch.testing.assert_close(level.box[left][0, :2], torch.tensor([1.25, 0.75]))


def test_missing_landmarks_are_masked_per_point():
    points = [10, 10, -1, -1, 20, 20, -1, -1, 30, 30]
    level = assigned(assign(face(21, 31, 10, 10, points=points), ANCHORS, STRIDES, GRIDS, anchor_t=4.0))[0]
    expected = torch.tensor([True, True, False, False, True, True, False, False, True, True])
    assert (level.landmark_mask == expected).all()


def test_faces_of_several_images_and_no_faces():
    targets = torch.cat([face(21, 31, 10, 10, image=0), face(40, 40, 12, 14, image=3)])
    level = assigned(assign(targets, ANCHORS, STRIDES, GRIDS, anchor_t=4.0))[0]
    assert set(level.image.tolist()) == {0, 3}
    empty = assigned(assign(torch.zeros(0, 16), ANCHORS, STRIDES, GRIDS, anchor_t=4.0))
    assert all(len(lv.image) == 0 for lv in empty)


def test_no_neighbour_outside_the_grid():
    # Centre (0.5, 0.5) px at stride 4 is in cell (0, 0) near its left/top edges, but there is no cell -1.
    level = assigned(assign(face(2, 2, 10, 10), ANCHORS, STRIDES, GRIDS, anchor_t=4.0))[0]
    assert level.cell_x.min() >= 0 and level.cell_y.min() >= 0
    assert set(zip(level.cell_x.tolist(), level.cell_y.tolist())) == {(0, 0)}


def test_shapes_do_not_depend_on_the_data():
    # 1 face x 3 anchors x 5 cells per level whether it fits there or not; invalid rows stay indexable.
    for level, (grid_h, grid_w) in zip(assign(face(2, 2, 10, 10), ANCHORS, STRIDES, GRIDS, anchor_t=4.0), GRIDS):
        assert level.valid.shape == (15,) and level.box.shape == (15, 4) and level.landmark_mask.shape == (15, 10)
        assert 0 <= level.cell_x.min() and level.cell_x.max() < grid_w and level.cell_y.max() < grid_h
        assert not level.landmark_mask[~level.valid].any() and torch.isfinite(level.box).all()
