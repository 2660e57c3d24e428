"""YOLOv5 target assignment: which anchors at which cells learn each face.

A face is a candidate for an anchor of a level when its width and height are both within a factor
`anchor_t` of the anchor's. It is then assigned to the cell holding its centre and to the two
neighbouring cells whose shared edge is closest to the centre (YOLOv5's 0.5-offset rule), so up
to 3 anchors x 3 cells per level learn it.

Every (anchor, cell offset, face) combination is kept, with a `valid` mask saying which of them are
assignments: the shapes depend only on the number of faces and the grid, never on the data. So the
step needs no `nonzero` and no host synchronisation (a GPU never waits for the CPU here), and the
loss traces to a static graph (torch.compile, CUDA graphs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adyolo.layout import TargetRow

_NEIGHBOUR_MARGIN = 0.5


def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cell offsets [5, 2]: the centre cell, then the cell to the left, above, right and below; the
    placeholder box [4] an invalid candidate regresses to: a unit box mid-cell), made on `device`.
    Built there rather than copied: a host-to-device copy inside the step would make the step wait. A
    placeholder is needed because a face of zero width, never an assignment, has a NaN CIoU, and `where`
    does not mask a NaN in the backward pass."""
    eye = torch.eye(2, device=device)
    offsets = torch.cat([torch.zeros(1, 2, device=device), eye, -eye])
    placeholder = torch.cat([torch.full((2,), 0.5, device=device), torch.ones(2, device=device)])
    return offsets, placeholder


@dataclass
class LevelTargets:
    """Candidates of one level; K = anchors x 5 cells x M faces, `valid` marks the assignments.
    Invalid rows hold in-range indices and finite values, so they can be gathered and masked out."""

    valid: torch.Tensor  # [K] bool: this (face, anchor, cell) is an assignment
    image: torch.Tensor  # [K] image index in the batch
    anchor: torch.Tensor  # [K] anchor index (0..2)
    cell_y: torch.Tensor  # [K] grid row
    cell_x: torch.Tensor  # [K] grid column
    box: torch.Tensor  # [K, 4] centre relative to the cell's corner, and size; grid units
    anchor_wh: torch.Tensor  # [K, 2] the anchor's size in grid units
    landmarks: torch.Tensor  # [K, 10] landmark positions relative to the cell's corner, grid units
    landmark_mask: torch.Tensor  # [K, 10] bool, False for missing points (and for invalid rows)
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
    offsets, placeholder = _constants(device)
    offsets = offsets[:, None]  # [5, 1, 2]
    num_faces = targets.shape[0]
    image = targets[:, TargetRow.IMAGE].long()
    cls = targets[:, TargetRow.CLASS].long()
    points = targets[:, TargetRow.LANDMARKS].view(-1, 5, 2)
    present = (points >= 0).all(dim=2, keepdim=True).expand(-1, 5, 2).reshape(-1, 10)  # -1 marks a missing point
    results = []
    for level, (grid_h, grid_w) in enumerate(grid_shapes):  # levels differ in grid size: a short static loop
        stride = strides[level]
        anchor_wh = anchors_px[level].to(device) / stride  # [A, 2]
        num_anchors = anchor_wh.shape[0]
        centre = targets[:, TargetRow.CENTRE] / stride  # [M, 2]
        size = targets[:, TargetRow.SIZE] / stride
        ratio = size[None] / anchor_wh[:, None]
        fits = torch.max(ratio, 1 / ratio).amax(dim=2) < anchor_t  # [A, M]

        # Neighbour cells: the one left (or right) and the one above (or below), whichever edge is near.
        frac = centre % 1
        inverse = torch.stack([grid_w - centre[:, 0], grid_h - centre[:, 1]], dim=1)
        left, up = ((frac < _NEIGHBOUR_MARGIN) & (centre > 1)).T
        right, down = (((inverse % 1) < _NEIGHBOUR_MARGIN) & (inverse > 1)).T
        use = torch.stack([torch.ones_like(left), left, up, right, down])  # [5, M]
        cell = (centre[None] - offsets * _NEIGHBOUR_MARGIN).long()  # [5, M, 2]
        cell[..., 0].clamp_(0, grid_w - 1)
        cell[..., 1].clamp_(0, grid_h - 1)
        box = torch.cat([centre[None] - cell, size[None].expand(5, -1, -1)], dim=2)  # [5, M, 4]
        landmarks = points[None] / stride - cell[:, :, None].to(points.dtype)  # [5, M, 5, 2]

        # Candidates in (anchor, offset, face) order: [A, 5, M] flattened to K.
        valid = (fits[:, None] & use[None]).reshape(-1)

        results.append(
            LevelTargets(
                valid=valid,
                image=_per_face(num_anchors, image),
                anchor=torch.arange(num_anchors, device=device).repeat_interleave(5 * num_faces),
                cell_y=_candidates(num_anchors, cell[..., 1]),
                cell_x=_candidates(num_anchors, cell[..., 0]),
                box=torch.where(valid[:, None], _candidates(num_anchors, box), placeholder),
                anchor_wh=anchor_wh.repeat_interleave(5 * num_faces, dim=0),
                landmarks=_candidates(num_anchors, landmarks.reshape(5, num_faces, 10)),
                landmark_mask=_per_face(num_anchors, present) & valid[:, None],
                cls=_per_face(num_anchors, cls),
            )
        )
    return results


def _candidates(num_anchors: int, t: torch.Tensor) -> torch.Tensor:
    """[5, M, ...] (per cell offset and face, the same for every anchor) -> [A x 5 x M, ...]."""
    return t[None].expand(num_anchors, *t.shape).reshape(-1, *t.shape[2:])


def _per_face(num_anchors: int, t: torch.Tensor) -> torch.Tensor:
    """[M, ...] -> [A x 5 x M, ...]."""
    return _candidates(num_anchors, t[None].expand(5, *t.shape))
