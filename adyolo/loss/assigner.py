"""YOLOv5 target assignment: which anchors at which cells learn each face.

A face is a candidate for an anchor of a level when its width and height are both within a factor
`anchor_t` of the anchor's. It is then assigned to the cell holding its centre and to the two
neighbouring cells whose shared edge is closest to the centre (YOLOv5's 0.5-offset rule), so up
to 3 anchors x 3 cells per level learn it. Everything is vectorised over faces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adyolo.layout import TargetRow

# Centre cell, then the cell to the left, above, right and below.
_OFFSETS = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], dtype=torch.float32)
_NEIGHBOUR_MARGIN = 0.5


@dataclass
class LevelTargets:
    """Assignments of one level; K = number of (face, anchor, cell) matches."""

    image: torch.Tensor  # [K] image index in the batch
    anchor: torch.Tensor  # [K] anchor index (0..2)
    cell_y: torch.Tensor  # [K] grid row
    cell_x: torch.Tensor  # [K] grid column
    box: torch.Tensor  # [K, 4] centre relative to the cell's corner, and size; grid units
    anchor_wh: torch.Tensor  # [K, 2] the anchor's size in grid units
    landmarks: torch.Tensor  # [K, 10] landmark positions relative to the cell's corner, grid units
    landmark_mask: torch.Tensor  # [K, 10] bool, False for missing points
    cls: torch.Tensor  # [K] class index


def assign(
    targets: torch.Tensor,
    anchors_px: torch.Tensor,
    strides: torch.Tensor,
    grid_shapes: list[tuple[int, int]],
    anchor_t: float,
) -> list[LevelTargets]:
    """targets [M, 16] (`TargetRow`: image, class, cx, cy, w, h, 10 landmark coordinates; pixels, -1 = missing),
    anchors_px [L, A, 2], strides [L], grid_shapes [(H, W)] per level -> one LevelTargets per level."""
    device = targets.device
    offsets = _OFFSETS.to(device)
    results = []
    for level, (grid_h, grid_w) in enumerate(grid_shapes):
        stride = strides[level]
        anchor_wh = anchors_px[level].to(device) / stride  # [A, 2]
        grid_size = torch.tensor([grid_w, grid_h], device=device, dtype=targets.dtype)
        # Every face paired with every anchor: [A, M, ...].
        centre = targets[:, TargetRow.CENTRE] / stride
        size = targets[:, TargetRow.SIZE] / stride
        ratio = size[None] / anchor_wh[:, None]
        fits = torch.max(ratio, 1 / ratio).amax(dim=2) < anchor_t  # [A, M]
        anchor_idx, face_idx = fits.nonzero(as_tuple=True)
        centre, size = centre[face_idx], size[face_idx]

        # Neighbour cells: the one left (or right) and the one above (or below), whichever edge is near.
        frac = centre % 1
        inverse = grid_size - centre
        left, up = ((frac < _NEIGHBOUR_MARGIN) & (centre > 1)).T
        right, down = (((inverse % 1) < _NEIGHBOUR_MARGIN) & (inverse > 1)).T
        use = torch.stack([torch.ones_like(left), left, up, right, down])  # [5, K0]
        which, match = use.nonzero(as_tuple=True)
        cell = (centre[match] - offsets[which] * _NEIGHBOUR_MARGIN).long()
        cell[:, 0].clamp_(0, grid_w - 1)
        cell[:, 1].clamp_(0, grid_h - 1)

        faces = face_idx[match]
        points = targets[faces, TargetRow.LANDMARKS]
        mask = points >= 0  # -1 marks a missing coordinate
        points_grid = points.view(-1, 5, 2) / stride - cell[:, None].to(points.dtype)
        results.append(
            LevelTargets(
                image=targets[faces, TargetRow.IMAGE].long(),
                anchor=anchor_idx[match],
                cell_y=cell[:, 1],
                cell_x=cell[:, 0],
                box=torch.cat([centre[match] - cell, size[match]], dim=1),
                anchor_wh=anchor_wh[anchor_idx[match]],
                landmarks=points_grid.view(-1, 10),
                landmark_mask=mask.view(-1, 5, 2).all(dim=2, keepdim=True).expand(-1, 5, 2).reshape(-1, 10),
                cls=targets[faces, TargetRow.CLASS].long(),
            )
        )
    return results
