"""The detector's outputs, strides, size and decoding, for both fusion variants."""

from __future__ import annotations

import copy

import pytest
import torch

from adyolo.model import ModelConfig, build_model
from adyolo.model.checkpoint import checkpointed_blocks
from adyolo.model.summary import count_gflops, count_parameters, count_training_gflops

from ..conftest import assert_tensors_agree

NUM_OUTPUTS = 16  # 4 box + 1 objectness + 10 landmark coordinates + 1 class


@pytest.mark.parametrize("fusion", ["full", "efficient"])
@pytest.mark.parametrize("size", ["n", "s"])
@pytest.mark.parametrize("height,width", [(640, 640), (320, 256)])
def test_four_levels_at_strides_4_8_16_32(size, fusion, height, width):
    model = build_model({"size": size, "fusion": fusion}).eval()
    assert model.strides == [4, 8, 16, 32]
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, height, width))
    assert [tuple(o.shape) for o in outputs] == [(2, 3, height // s, width // s, NUM_OUTPUTS) for s in (4, 8, 16, 32)]
    assert all(torch.isfinite(o).all() for o in outputs)


def test_mapping_and_dataclass_build_the_same_model():
    torch.manual_seed(0)
    from_mapping = build_model({"size": "n", "fusion": "efficient", "checkpoint": ["neck.low_fusion"]})
    torch.manual_seed(0)
    from_dataclass = build_model(ModelConfig(size="n", fusion="efficient", checkpoint=["neck.low_fusion"]))
    a, b = from_mapping.state_dict(), from_dataclass.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert from_mapping.cfg == from_dataclass.cfg


def test_defaults_are_the_sdpa_baseline():
    cfg = build_model().cfg
    assert (cfg.size, cfg.fusion, cfg.attention, cfg.img_size) == ("s", "full", "sdpa", 640)


@pytest.mark.parametrize(
    "fusion,params_m,gflops",
    # Independent analytic count of the recommended layer list (shared research, model.md section 6).
    [("full", 9.1, 46.0), ("efficient", 9.9, 25.0)],
)
def test_size_s_matches_the_analytic_count(fusion, params_m, gflops):
    model = build_model({"size": "s", "fusion": fusion})
    assert count_parameters(model) / 1e6 == pytest.approx(params_m, rel=0.03)
    assert count_gflops(model, 640) == pytest.approx(gflops, rel=0.03)


def test_flop_count_sees_the_attention_whichever_implementation():
    # The explicit form is plain matmuls, which the counter always sees; the fused kernel must count the same.
    sdpa = count_gflops(build_model({"size": "n", "attention": "sdpa"}), 320)
    explicit = count_gflops(build_model({"size": "n", "attention": "explicit"}), 320)
    assert sdpa == pytest.approx(explicit, rel=1e-9)


def test_training_flops_are_forward_and_backward_and_ignore_the_recompute():
    plain = build_model({"size": "n", "fusion": "full"})
    checkpointed = build_model({"size": "n", "fusion": "full", "checkpoint": ["all"]})
    forward = count_gflops(plain, 320)
    training = count_training_gflops(plain, 320)
    # Backward costs about twice the forward (input and weight gradients; the first conv has no input grad).
    assert 2.6 * forward < training < 3.05 * forward
    assert count_training_gflops(checkpointed, 320) == pytest.approx(training, rel=1e-9)
    assert checkpointed_blocks(checkpointed)  # counting did not unmark the real model's blocks


def test_decode_of_zero_logits_puts_boxes_at_cell_centres_with_anchor_sizes():
    model = build_model({"size": "n"})
    head = model.head
    raw = [torch.zeros(1, 3, 2, 3, NUM_OUTPUTS) for _ in range(4)]
    decoded = head.decode(raw)
    assert decoded.shape == (1, 4 * 3 * 2 * 3, NUM_OUTPUTS)
    level0 = decoded[0, : 3 * 2 * 3].view(3, 2, 3, NUM_OUTPUTS)  # anchors, rows, cols
    # sigmoid(0) = 0.5: centre (2*0.5 - 0.5 + cell) * stride, size (2*0.5)^2 * anchor.
    anchor, row, col = 1, 1, 2
    box = level0[anchor, row, col]
    assert box[:2].tolist() == [(0.5 + col) * 4, (0.5 + row) * 4]
    assert box[2:4].tolist() == head.anchors[0, anchor].tolist()
    assert box[4].item() == 0.5 and box[15].item() == 0.5
    # Landmarks are t * anchor + cell * stride: t = 0 puts all five at the cell's corner.
    assert box[5:15].tolist() == [col * 4.0, row * 4.0] * 5


def test_decode_of_bf16_outputs_keeps_sub_pixel_positions():
    """The head's maps come out of a bf16 forward in bf16; decoded in bf16, a centre near 200 px would be
    rounded to whole pixels. Decoding is in fp32: a bf16 map decodes as its fp32 copy does."""
    head = build_model({"size": "n"}).head
    torch.manual_seed(0)
    raw = [torch.randn(1, 3, 64 // 2**i, 64 // 2**i, NUM_OUTPUTS).bfloat16() for i in range(4)]
    decoded = head.decode(raw)
    assert decoded.dtype == torch.float32
    assert torch.equal(decoded, head.decode([r.float() for r in raw]))
    centres = decoded[0, : 3 * 64 * 64, 0]  # stride 4: up to 256 px
    assert (centres[centres > 128] % 1 != 0).float().mean() > 0.9  # not whole pixels


def test_bias_prior_of_objectness():
    model = build_model({"size": "n"})
    # YOLOv5 prior: log(8 / (640 / stride)^2) added to the objectness logit; conv bias starts near 0.
    obj_bias = model.head.convs[0].bias.view(3, NUM_OUTPUTS)[:, 4]
    assert obj_bias.mean().item() == pytest.approx(torch.log(torch.tensor(8 / 160**2)).item(), abs=0.2)


def test_channels_last_gives_the_same_outputs_and_gradients():
    # float64, so that the different conv algorithms' rounding cannot hide a layout bug.
    model = build_model({"size": "n"}).double()
    twin = copy.deepcopy(model).to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 128, 96, dtype=torch.float64)
    torch.manual_seed(1)  # same stochastic-depth draws for both
    outputs = model(images)
    torch.manual_seed(1)
    outputs_cl = twin(images.to(memory_format=torch.channels_last))
    sum(o.square().mean() for o in outputs).backward()
    sum(o.square().mean() for o in outputs_cl).backward()
    assert_tensors_agree(outputs_cl, outputs, 1e-10)
    assert_tensors_agree([p.grad for p in twin.parameters()], [p.grad for p in model.parameters()], 1e-10)


@pytest.mark.parametrize(
    "network", [{"fusion": "full"}, {"fusion": "efficient"}, {"neck": "yolov5face"}], ids=lambda n: str(*n.values())
)
def test_bf16_autocast_forward_and_backward(network):
    model = build_model({"size": "n", **network})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(torch.randn(2, 3, 128, 128))
        loss = sum(o.float().square().mean() for o in outputs)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # BatchNorm statistics stay fp32 under autocast.
    assert model.backbone.stem.stem_1[1].running_mean.dtype == torch.float32
