"""The synthetic training batch: the collate layout, faces for every head level, deterministic."""

from __future__ import annotations

import torch

from adyolo.data.batch import SYNTHETIC_FACE_PX, SYNTHETIC_FACES_PER_IMAGE, synthetic_batch
from adyolo.layout import TargetRow
from adyolo.loss.assigner import assign
from adyolo.loss.config import LossConfig
from adyolo.model.config import DEFAULT_ANCHORS

STRIDES = torch.tensor([4.0, 8.0, 16.0, 32.0])


def test_layout_matches_the_collated_batch():
    batch = synthetic_batch(3, 640, seed=1)
    images, targets = batch["images"], batch["targets"]
    assert images.shape == (3, 3, 640, 640) and images.dtype == torch.uint8 and batch["skipped"] == []
    assert targets.shape == (3 * SYNTHETIC_FACES_PER_IMAGE, TargetRow.COLUMNS)
    counts = torch.bincount(targets[:, TargetRow.IMAGE].long())
    assert counts.tolist() == [SYNTHETIC_FACES_PER_IMAGE] * 3 and (targets[:, TargetRow.CLASS] == 0).all()
    sides = targets[:, TargetRow.SIZE]
    low, high = SYNTHETIC_FACE_PX
    assert (sides[:, 0] == sides[:, 1]).all() and sides.min() >= low and sides.max() <= high
    centre = targets[:, TargetRow.CENTRE]
    assert ((centre - sides / 2) >= 0).all() and ((centre + sides / 2) <= 640).all()  # faces inside the image
    points = targets[:, TargetRow.LANDMARKS].view(-1, 5, 2)
    assert ((points - centre[:, None]).abs() <= sides[:, None] / 2).all()  # landmarks on the face


def test_every_head_level_gets_targets():
    targets = synthetic_batch(4, 640, seed=0)["targets"]
    anchors = torch.tensor(DEFAULT_ANCHORS).view(4, 3, 2)
    grids = [(640 // s, 640 // s) for s in (4, 8, 16, 32)]
    levels = assign(targets, anchors, STRIDES, grids, LossConfig().anchor_t)
    assert all(level.valid.any() for level in levels), [int(level.valid.sum()) for level in levels]


def test_deterministic_in_the_seed():
    a, b, c = synthetic_batch(2, 96, seed=5), synthetic_batch(2, 96, seed=5), synthetic_batch(2, 96, seed=6)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["targets"], b["targets"])
    assert not torch.equal(a["targets"], c["targets"])
