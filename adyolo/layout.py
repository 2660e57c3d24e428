"""Column layouts of the tensors that carry faces, named once.

Four row formats travel through adyolo; every module indexes them through these names:

    LabelRow      [N, 15]  one image's faces: a label file line (normalised to [0, 1]) or a dataset
                           sample's targets (pixels of the network input)
    TargetRow     [M, 16]  a batch's faces: LabelRow with the image's index in the batch in front
                           (pixels of the network input); what the loss and its assigner read
    AnchorOutput  [15 + C] one anchor's prediction: the last dimension of the head's raw maps
                           [B, A, H, W, 15 + C] and of the decoded predictions [B, N, 15 + C]
    DetectionRow  [K, 16]  one image's detections after NMS: corner box, score, landmarks, class

A missing landmark coordinate is -1 in LabelRow and TargetRow. Landmarks are five (x, y) points in
the order left eye, right eye, nose, left mouth corner, right mouth corner (as seen in the image).

This module needs nothing but Python, so the model package can use it.
"""

from __future__ import annotations

NUM_LANDMARKS = 5
LANDMARK_COORDS = 2 * NUM_LANDMARKS  # x, y per point
MISSING_COORD = -1.0  # a landmark coordinate that is not annotated


class LabelRow:
    """[N, 15]: class, cx, cy, w, h, 5 x (x, y)."""

    CLASS = 0
    BOX = slice(1, 5)  # cx, cy, w, h
    CENTRE = slice(1, 3)
    SIZE = slice(3, 5)
    LANDMARKS = slice(5, 15)
    COLUMNS = 15
    BOX_ONLY_COLUMNS = 5  # a label line may give the box without landmarks


class TargetRow:
    """[M, 16]: image index in the batch, class, cx, cy, w, h, 5 x (x, y); pixels of the network input."""

    IMAGE = 0
    CLASS = 1
    BOX = slice(2, 6)  # cx, cy, w, h
    CENTRE = slice(2, 4)
    SIZE = slice(4, 6)
    LANDMARKS = slice(6, 16)
    COLUMNS = 16


class AnchorOutput:
    """[15 + C]: box (4), objectness (1), 5 x (x, y) landmarks (10), C class scores.

    Raw head maps hold the network's parametrisation (t_xy, t_wh, logits, landmark offsets in anchor
    units); decoded predictions hold cx, cy, w, h and landmarks in input pixels and sigmoid scores
    (see `adyolo.model.head`)."""

    BOX = slice(0, 4)
    XY = slice(0, 2)
    WH = slice(2, 4)
    OBJ = 4
    LANDMARKS = slice(5, 15)
    CLASSES = 15  # first class column; C = channels - CLASSES
    CHANNELS_WITHOUT_CLASSES = 15


class DetectionRow:
    """[K, 16]: x1, y1, x2, y2, score, 5 x (x, y) landmarks, class (as a float); pixels."""

    BOX = slice(0, 4)  # x1, y1, x2, y2
    CORNER_1 = slice(0, 2)
    CORNER_2 = slice(2, 4)
    SCORE = 4
    LANDMARKS = slice(5, 15)
    CLASS = 15
    COLUMNS = 16
