"""Decoding + confidence filter + NMS on hand-built maps."""

from __future__ import annotations

import torch

from adyolo.model import build_model
from adyolo.predict.postprocess import postprocess, unletterbox


def row(cx, cy, w, h, obj, cls=None):
    points = [cx + i for i in range(10)]
    return [cx, cy, w, h, obj, *points, *(cls or [1.0])]


def test_nms_keeps_the_best_of_overlapping_boxes_and_drops_low_scores():
    decoded = torch.tensor(
        [
            [
                row(50, 50, 20, 20, 0.8),
                row(52, 50, 20, 20, 0.9),  # overlaps the first (IoU 0.82): suppresses it
                row(150, 50, 20, 20, 0.7),  # elsewhere: kept
                row(250, 50, 20, 20, 0.01),  # under the confidence threshold
            ]
        ]
    )
    (dets,) = postprocess(decoded, conf_threshold=0.02, iou_threshold=0.5)
    assert dets.shape == (2, 16)
    torch.testing.assert_close(dets[:, 4], torch.tensor([0.9, 0.7]))
    torch.testing.assert_close(dets[0, :4], torch.tensor([42.0, 40.0, 62.0, 60.0]))
    torch.testing.assert_close(dets[0, 5:15], torch.arange(10.0) + 52)  # its own landmarks travel with it


def test_several_classes_score_by_objectness_times_class_and_nms_per_class():
    decoded = torch.tensor(
        [
            [
                row(50, 50, 20, 20, 0.9, cls=[0.5, 0.1]),
                row(51, 50, 20, 20, 0.8, cls=[0.1, 0.9]),  # same place, other class: both kept
            ]
        ]
    )
    (dets,) = postprocess(decoded, conf_threshold=0.1)
    torch.testing.assert_close(dets[:, 4], torch.tensor([0.72, 0.45]))
    assert dets[:, 15].tolist() == [1.0, 0.0]


def test_one_confident_anchor_in_raw_maps_gives_one_detection_where_expected():
    model = build_model({"size": "n"})
    raw = [torch.full((1, 3, 640 // s, 640 // s, 16), -10.0) for s in (4, 8, 16, 32)]
    for r in raw:
        r[..., :4] = 0.0
    raw[1][0, 2, 5, 7, 4] = 10.0  # stride 8, anchor 2, row 5, column 7
    (dets,) = postprocess(model.head.decode(raw), conf_threshold=0.5)
    assert len(dets) == 1
    # sigmoid(0) = 0.5: centre (0.5 + 7, 0.5 + 5) * 8 = (60, 44); size = anchor 37 x 47.
    torch.testing.assert_close(dets[0, :4], torch.tensor([60 - 18.5, 44 - 23.5, 60 + 18.5, 44 + 23.5]))


def test_unletterbox_inverts_the_letterbox_mapping():
    dets = torch.tensor([[10.0, 30.0, 50.0, 70.0, 0.9, *([20.0, 40.0] * 5), 0.0]])
    out = unletterbox(dets, ratio=2.0, pad_x=0.0, pad_y=10.0)
    torch.testing.assert_close(out[0, :4], torch.tensor([5.0, 10.0, 25.0, 30.0]))
    torch.testing.assert_close(out[0, 5:7], torch.tensor([10.0, 15.0]))
    assert out[0, 4] == 0.9 and out[0, 15] == 0.0
