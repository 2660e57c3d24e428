"""`model.neck: yolov5face`: the YOLOv5s-face baseline in adyolo's blocks (PAN neck, 3 levels P3-P5)."""

from __future__ import annotations

import pytest
import torch

from adyolo.model import ModelConfig, build_model
from adyolo.model.config import (
    BACKBONE_BLOCKS,
    CHECKPOINTABLE_BLOCKS_BY_NECK,
    DEFAULT_ANCHORS,
    YOLOV5FACE_ANCHORS,
    YOLOV5FACE_NECK_BLOCKS,
)
from adyolo.model.summary import count_gflops, count_parameters, summarize
from adyolo.schema import ConfigError, to_dict

NUM_OUTPUTS = 16  # 4 box + 1 objectness + 10 landmark coordinates + 1 class


@pytest.mark.parametrize("height,width", [(128, 96), (64, 64)])
def test_three_levels_at_strides_8_16_32(height, width):
    model = build_model({"size": "n", "neck": "yolov5face", "img_size": 128}).eval()
    assert model.strides == [8, 16, 32] and model.cfg.strides == (8, 16, 32)
    assert model.head.num_levels == 3 and model.head.anchors.shape == (3, 3, 2)
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, height, width))
    assert [tuple(o.shape) for o in outputs] == [(2, 3, height // s, width // s, NUM_OUTPUTS) for s in (8, 16, 32)]
    assert all(torch.isfinite(o).all() for o in outputs)
    decoded = model.head.decode(outputs)
    assert decoded.shape == (2, 3 * sum(height // s * width // s for s in (8, 16, 32)), NUM_OUTPUTS)


def test_size_s_is_yolov5s_face():
    # yolov5-face's README: yolov5s-face 7.075 M parameters. FLOPs as YOLOv5 counts them (2 x multiply-
    # accumulates of the convolutions, forward, one 640 x 640 image).
    model = build_model({"size": "s", "neck": "yolov5face"})
    assert count_parameters(model) == 7_074_640
    assert count_parameters(model) / 1e6 == pytest.approx(7.075, rel=0.01)
    assert count_gflops(model, 640) == pytest.approx(15.23, rel=0.01)
    # yolov5s.yaml's head at width 0.5: P3 128, P4 256, P5 512 channels; C3 repeats 3 x 0.33 -> 1.
    assert model.neck.out_channels == (128, 256, 512)
    assert len(model.neck.top_down_p4.refine.m) == 1 and not model.neck.top_down_p4.refine.m[0].shortcut
    assert model.neck.lateral5[0].out_channels == 256 and model.neck.lateral4[0].out_channels == 128
    assert model.neck.bottom_up_p5.down[0].stride == (2, 2)
    assert str(summarize(model, 640)).startswith("YOLOv5-Face size=s neck=yolov5face: 7.075 M parameters, 15.23")


def test_anchors_default_per_neck_and_are_written_into_the_config():
    gd, yolo = ModelConfig(), ModelConfig(neck="yolov5face")
    assert gd.anchors == DEFAULT_ANCHORS and len(gd.anchors) == 4
    assert (
        yolo.anchors
        == YOLOV5FACE_ANCHORS
        == [[4, 5, 8, 10, 13, 16], [23, 29, 43, 55, 73, 105], [146, 217, 231, 300, 335, 433]]
    )
    saved = to_dict(yolo)
    assert saved["anchors"] == YOLOV5FACE_ANCHORS and saved["neck"] == "yolov5face"
    assert ModelConfig(**saved) == yolo  # a saved config builds the same model
    torch.testing.assert_close(
        build_model(saved).head.anchors, torch.tensor(YOLOV5FACE_ANCHORS, dtype=torch.float32).view(3, 3, 2)
    )


@pytest.mark.parametrize(
    "neck,anchors,expected",
    [
        ("yolov5face", DEFAULT_ANCHORS, "expected 3 levels (strides 8, 16, 32) for neck 'yolov5face'"),
        ("gd", YOLOV5FACE_ANCHORS, "expected 4 levels (strides 4, 8, 16, 32) for neck 'gd'"),
    ],
)
def test_anchors_of_the_other_neck_are_refused(neck, anchors, expected):
    with pytest.raises(ConfigError, match=r"^model.anchors: " + expected.replace("(", r"\(").replace(")", r"\)")):
        build_model({"neck": neck, "anchors": anchors})


def test_checkpoint_names_follow_the_neck():
    for neck in ("gd", "yolov5face"):
        cfg = ModelConfig(neck=neck, checkpoint=["all"])
        assert cfg.checkpointed_blocks == CHECKPOINTABLE_BLOCKS_BY_NECK[neck]
        assert ModelConfig(neck=neck, checkpoint=list(BACKBONE_BLOCKS)).checkpointed_blocks == BACKBONE_BLOCKS
    with pytest.raises(ConfigError, match="unknown block 'neck.low_fusion' for neck 'yolov5face'") as err:
        ModelConfig(neck="yolov5face", checkpoint=["neck.low_fusion"])
    assert "neck.top_down_p3" in str(err.value) and "neck.inject_p2" not in str(err.value)
    with pytest.raises(ConfigError, match="unknown block 'neck.top_down_p3' for neck 'gd'"):
        ModelConfig(checkpoint=["neck.top_down_p3"])
    model = build_model({"size": "n", "neck": "yolov5face", "checkpoint": ["all"]})
    for name in YOLOV5FACE_NECK_BLOCKS:
        model.get_submodule(name)  # every name is a submodule


def test_gd_settings_do_not_change_the_baseline():
    torch.manual_seed(0)
    plain = build_model({"size": "n", "neck": "yolov5face"})
    torch.manual_seed(0)
    other = build_model(
        {"size": "n", "neck": "yolov5face", "fusion": "efficient", "high_stride": 32, "attention_heads": 3}
    )
    a, b = plain.state_dict(), other.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ModelConfig(neck="yolov5face", fusion="full").variant == "yolov5face"
    assert not ModelConfig(neck="yolov5face").uses_attention
