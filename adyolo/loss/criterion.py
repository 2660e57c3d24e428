"""DetectionLoss: assign targets, then box / objectness / class / landmark terms, YOLOv5-Face weighted."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adyolo.layout import NUM_LANDMARKS, AnchorOutput
from adyolo.loss.assigner import LevelTargets, assign
from adyolo.loss.config import LossConfig
from adyolo.loss.terms import ciou_loss, wing_loss
from adyolo.schema import ConfigError

MIN_SIZE = 1e-3  # grid cells
# YOLOv5 (v2-v4 loss.py) scales the loss gains, tuned for 3 output levels, by 3 / levels, and gives
# objectness this extra factor when there are 4 levels (its P3-P6 models): the GD head has 4 (P2-P5),
# the yolov5face baseline 3 (P3-P5).
REFERENCE_LEVELS = 3
FOUR_LEVEL_OBJ_GAIN = 1.4


@dataclass(frozen=True)
class LossNorm:
    """What a micro-batch's loss is normalised by: the whole global batch of its optimizer step.

    `images`: the global batch; `counts` [L, 2] float: per level, the face-anchor assignments and the
    present landmark coordinates over every micro-batch of every rank in the step (summed from
    `DetectionLoss.counts`; an all-reduce across ranks). With these, the micro-batches' losses add up
    exactly to the loss of the global batch computed in one piece, however it is split."""

    images: int
    counts: torch.Tensor


class DetectionLoss:
    """raw head outputs (L x [B, A, H, W, 15 + C], `AnchorOutput`; L = 4 levels for the GD neck, 3 for
    yolov5face) + targets [M, 16] (`TargetRow`, pixels) -> loss terms.

    The loss of a global batch of G images is YOLOv5's: the weighted mean terms (box, class and landmark
    terms averaged over the batch's assignments, objectness over its cells) times G, so the gradient is
    G x the mean per-image gradient and the learning rates of YOLO recipes carry over to any batch split.
    Called with `norm` (the global batch's `LossNorm`), "total" is this micro-batch's part of that loss;
    without it, the micro-batch is the whole batch. Returns {"box", "obj", "cls", "landmark"} (detached:
    this micro-batch's part of the batch's mean terms, for logging) and "total" (to backpropagate).
    """

    def __init__(self, cfg: LossConfig, anchors_px: torch.Tensor, strides: torch.Tensor, num_classes: int):
        self.cfg = cfg
        self.anchors_px = anchors_px.detach().float()  # [L, A, 2]
        self.strides = strides.detach().float()  # [L]
        self.level_strides = [int(s) for s in strides.tolist()]  # for the grids, without a device read
        self.num_classes = num_classes
        # Objectness weight per level: the config's, or YOLOv5's default for L levels (ConfigError if
        # the config's has another length).
        try:
            self.balance = cfg.balance_for(len(self.strides))
        except ConfigError as err:
            raise err.under("loss") from None

    def assign(self, targets: torch.Tensor, image_size: tuple[int, int]) -> list[LevelTargets]:
        """targets [M, 16] (`TargetRow`) of a batch of images of `image_size` (H, W) -> one `LevelTargets`
        per level: known before the forward (the grids follow from the image size and the strides)."""
        return self._assign(targets, [(image_size[0] // s, image_size[1] // s) for s in self.level_strides])

    def _assign(self, targets: torch.Tensor, grids: list[tuple[int, int]]) -> list[LevelTargets]:
        device = targets.device
        if self.anchors_px.device != device:  # moved once, not copied to the device every step
            self.anchors_px, self.strides = self.anchors_px.to(device), self.strides.to(device)
        return assign(targets.float(), self.anchors_px, self.strides, grids, self.cfg.anchor_t)

    @staticmethod
    def counts(levels: list[LevelTargets]) -> torch.Tensor:
        """[L, 2] float: per level, the assignments and the present landmark coordinates (for `LossNorm`)."""
        return torch.stack([torch.stack([t.valid.sum(), t.landmark_mask.sum()]) for t in levels]).float()

    def __call__(
        self,
        raw: list[torch.Tensor],
        targets: torch.Tensor,
        levels: list[LevelTargets] | None = None,
        norm: LossNorm | None = None,
    ) -> dict[str, torch.Tensor]:
        """`levels`: `assign(targets, ...)` of this batch, when already made; `norm`: the global batch this
        micro-batch belongs to (None: this batch alone)."""
        cfg = self.cfg
        device = raw[0].device
        batch_size = raw[0].shape[0]
        if levels is None:
            levels = self._assign(targets, [(p.shape[2], p.shape[3]) for p in raw])
        counts = norm.counts if norm is not None else self.counts(levels)
        images = norm.images if norm is not None else batch_size
        zero = torch.zeros((), device=device)
        box, obj, cls, landmark = zero, zero, zero, zero
        for level, (pred, t) in enumerate(zip(raw, levels)):
            pred = pred.float()  # losses in fp32 whatever the forward's precision
            # Every candidate is gathered and the invalid ones masked (`torch.where`, not a multiply, so
            # nothing non-finite can leak in): no data-dependent shape, no host synchronisation.
            picked = pred[t.image, t.anchor, t.cell_y, t.cell_x]  # [K, 15 + C]
            valid = t.valid
            count = counts[level, 0].clamp(min=1)
            xy = picked[:, AnchorOutput.XY].sigmoid() * 2 - 0.5
            # CIoU divides by the predicted height with no epsilon: a size that
            # underflows to 0 would give NaN. A floor of 1e-3 cells is far below a pixel.
            wh = ((picked[:, AnchorOutput.WH].sigmoid() * 2) ** 2 * t.anchor_wh).clamp(min=MIN_SIZE)
            box_loss = torch.where(valid, ciou_loss(torch.cat([xy, wh], dim=1), t.box), 0.0)
            box = box + box_loss.sum() / count
            # Objectness learns how well the box fits (CIoU, clamped at 0), not just "a face is here".
            # Where two faces claim one anchor the better fit is kept (YOLOv5 keeps whichever is
            # written last, which on a GPU is not even deterministic).
            fit = torch.where(valid, (1 - box_loss).detach().clamp(min=0), 0.0)
            obj_target = torch.zeros(pred.shape[:4], device=device)
            cell_index = ((t.image * pred.shape[1] + t.anchor) * pred.shape[2] + t.cell_y) * pred.shape[3] + t.cell_x
            obj_target.view(-1).scatter_reduce_(0, cell_index, fit, reduce="amax")
            if self.num_classes > 1:
                # Not F.one_hot: on a GPU it reads the class range back to check it (a host sync).
                one_hot = (t.cls[:, None] == torch.arange(self.num_classes, device=device)).float()
                per_row = F.binary_cross_entropy_with_logits(
                    picked[:, AnchorOutput.CLASSES :], one_hot, reduction="none"
                ).mean(dim=1)
                cls = cls + torch.where(valid, per_row, 0.0).sum() / count
            points = picked[:, AnchorOutput.LANDMARKS] * t.anchor_wh.repeat(1, NUM_LANDMARKS)
            mask = t.landmark_mask
            point_loss = wing_loss(points, t.landmarks, cfg.wing_width, cfg.wing_curvature)
            landmark = landmark + torch.where(mask, point_loss, 0.0).sum() / counts[level, 1].clamp(min=1)
            obj_loss = F.binary_cross_entropy_with_logits(pred[..., AnchorOutput.OBJ], obj_target)
            if batch_size != images:  # this micro-batch's share of the global batch's mean over cells
                obj_loss = obj_loss * (batch_size / images)
            obj = obj + obj_loss * self.balance[level]
        scale = REFERENCE_LEVELS / len(raw)
        box = box * cfg.box * scale
        obj = obj * cfg.obj * scale * (FOUR_LEVEL_OBJ_GAIN if len(raw) == 4 else 1.0)
        cls = cls * cfg.cls * scale
        landmark = landmark * cfg.landmark * scale
        return {
            "total": (box + obj + cls + landmark) * images,
            "box": box.detach(),
            "obj": obj.detach(),
            "cls": cls.detach(),
            "landmark": landmark.detach(),
        }
