"""The batch a training step consumes: built from dataset samples (`collate`) or made up (`synthetic_batch`).

A batch is a dict:
    images     uint8 [B, 3, S, S] RGB; the network input is images / 255
    targets    float32 [M, 16] `TargetRow`: image index in the batch, class, cx, cy, w, h, 5 x (x, y),
               in pixels of the network input; -1 for a missing landmark coordinate
    skipped    list[int]: indices of the unreadable images replaced while building this batch
    indices    int64 [B], letterbox float32 [B, 3] (ratio, pad_x, pad_y), paths list[str]
               (only from `collate`: validation maps detections back to the original images with them)
"""

from __future__ import annotations

import math

import torch

from adyolo.layout import NUM_LANDMARKS, LabelRow, TargetRow

# A synthetic batch's faces: this many per image, with sides log-uniform between these many pixels.
# 6 px is below the smallest anchor (P2), 160 px is at the largest anchors of P4 / the smallest of P5,
# so every level of the head gets targets and the loss takes its full path.
SYNTHETIC_FACES_PER_IMAGE = 12
SYNTHETIC_FACE_PX = (6.0, 160.0)
# Landmarks scatter over the middle of the face: within this fraction of its side around the centre.
SYNTHETIC_LANDMARK_SPREAD = 0.6


def collate(samples: list[dict]) -> dict:
    """`FaceDataset` samples -> a batch (all keys above)."""
    targets = [
        torch.cat([torch.full((len(s["targets"]), 1), float(i)), s["targets"]], dim=1) for i, s in enumerate(samples)
    ]
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "targets": torch.cat(targets) if targets else torch.zeros(0, TargetRow.COLUMNS),
        "skipped": [i for s in samples for i in s["skipped"]],
        "indices": torch.tensor([s["index"] for s in samples]),
        "letterbox": torch.tensor([s["letterbox"] for s in samples], dtype=torch.float32),
        "paths": [s["path"] for s in samples],
    }


def synthetic_batch(images: int, size: int, device: torch.device | str = "cpu", seed: int = 0) -> dict:
    """A training batch of random pixels with `SYNTHETIC_FACES_PER_IMAGE` faces per image, on `device`:
    images, targets and skipped, as `collate` gives them. What the benchmark times, the micro-batch
    probe and the memory planner measure, and tests train on; deterministic in `seed`."""
    gen = torch.Generator().manual_seed(seed)
    count = images * SYNTHETIC_FACES_PER_IMAGE
    low, high = SYNTHETIC_FACE_PX
    side = torch.exp(torch.empty(count).uniform_(math.log(low), math.log(high), generator=gen))
    side = side.clamp(max=size / 2)
    centre = side[:, None] / 2 + torch.rand(count, 2, generator=gen) * (size - side[:, None])
    jitter = torch.rand(count, NUM_LANDMARKS, 2, generator=gen) - 0.5
    points = centre[:, None, :] + jitter * side[:, None, None] * SYNTHETIC_LANDMARK_SPREAD
    faces = torch.zeros(count, LabelRow.COLUMNS)  # class 0
    faces[:, LabelRow.CENTRE] = centre
    faces[:, LabelRow.SIZE] = side[:, None]
    faces[:, LabelRow.LANDMARKS] = points.flatten(1)
    image_index = torch.arange(images).repeat_interleave(SYNTHETIC_FACES_PER_IMAGE).float()[:, None]
    targets = torch.cat([image_index, faces], dim=1)
    pixels = torch.randint(0, 256, (images, 3, size, size), dtype=torch.uint8, generator=gen)
    return {"images": pixels.to(device), "targets": targets.to(device), "skipped": []}
