"""ONNX export of a trained detector, and the check of the exported file against PyTorch.

The exported graph takes

    images   float32 [B, 3, H, W], RGB in [0, 1] (the uint8 image / 255, as in training and evaluation)

and returns, with `decode=True` (the default: what a mobile app wants, one tensor and no anchor logic
of its own, only a score threshold and NMS)

    detections  float32 [B, N, 15 + C], N = 3 * sum over the levels' strides s of H/s * W/s
                (s = 4, 8, 16, 32 for the GD neck; 8, 16, 32 for `model.neck: yolov5face`)
                columns cx, cy, w, h (input pixels), objectness, 5 x (x, y) landmarks (input pixels),
                C class scores (sigmoid); score = objectness * class score

or, with `decode=False`, the head's raw maps (to decode elsewhere, e.g. on an accelerator that lacks an op):

    p2, p3, p4, p5  float32 [B, 3, H/s, W/s, 15 + C] for strides s = 4, 8, 16, 32 (GD neck)
    p3, p4, p5      the same for strides s = 8, 16, 32 (`model.neck: yolov5face`)

(`p<k>` is the level of stride 2^k: `raw_output_names`.)

A fixed export has B and H x W of the export; a dynamic one takes any batch and any H, W that are
multiples of 32 (the largest stride), from 64 to `MAX_DYNAMIC_SIDE` pixels.

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript). The legacy TorchScript
exporter cannot export adaptive pooling to a size that is not a constant divisor of the input, which
High-GD's ceil(H/64) target is in a dynamic graph; the dynamo exporter keeps the sizes symbolic, and the
neck avoids the one lowering that does not (`adyolo.model.neck.pool_to`). `scaled_dot_product_attention`
(`fusion: full`, `attention: sdpa`) becomes MatMul / Softmax / MatMul at the default opset 18.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from adyolo.model import ADYOLOFace
from adyolo.model.config import MAX_STRIDE

# 18: the dynamo exporter's oldest native opset; mobile runtimes (ONNX Runtime Mobile, TensorRT, NNAPI
# and CoreML converters) support it widely. Newer opsets work too (23 turns SDPA into one Attention op).
DEFAULT_OPSET = 18
# Largest side of a dynamic export, in pixels, and the largest batch: bounds for torch.export's symbols.
MAX_DYNAMIC_SIDE = 4096
MAX_DYNAMIC_BATCH = 1024
# Pass bound of the check: |onnx - torch| / max(|torch|, 1) for every output element, i.e. an absolute
# error for values up to 1 (logits, scores) and a relative one for pixel coordinates. Exported graphs
# differ from PyTorch in float rounding only (1e-6 to 1e-5: docs/measurements.md), a wrong op (a baked-in
# size, a different resize) by 1e-2 or more; 1e-3 leaves room for deeper models.
DEFAULT_TOLERANCE = 1e-3
INPUT_NAME = "images"
RAW_OUTPUT_NAMES = ("p2", "p3", "p4", "p5")  # the GD detector's; `raw_output_names` for any model
DECODED_OUTPUT_NAME = "detections"


class DeployModel(nn.Module):
    """images [B, 3, H, W] -> detections [B, N, 15 + C] (decode) or the raw maps [B, 3, H/s, W/s, 15 + C],
    one per level (4 for the GD neck, 3 for yolov5face)."""

    def __init__(self, model: ADYOLOFace, decode: bool = True):
        super().__init__()
        self.model = model
        self.decode = decode

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        raw = self.model(images)
        return self.model.head.decode(raw) if self.decode else tuple(raw)


@dataclass
class ExportReport:
    path: Path
    seconds: float
    size_bytes: int
    input_shape: list[int | str]
    output_names: list[str]


@dataclass
class Comparison:
    """ONNX Runtime vs PyTorch on one input: the worst error over all outputs."""

    label: str
    input_shape: tuple[int, ...]
    max_abs: float
    """max |onnx - torch|"""
    max_rel: float
    """max |onnx - torch| / max(|torch|, 1): what the tolerance bounds"""
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_rel <= self.tolerance

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        shape = "x".join(map(str, self.input_shape))
        return (
            f"{verdict:4s} {self.label:24s} input {shape:16s} max abs err {self.max_abs:.2e}, "
            f"max rel err {self.max_rel:.2e} (tolerance {self.tolerance:.0e})"
        )


def raw_output_names(strides) -> list[str]:
    """`p<k>` for each level of stride 2^k: (4, 8, 16, 32) -> p2, p3, p4, p5; (8, 16, 32) -> p3, p4, p5."""
    return [f"p{int(s).bit_length() - 1}" for s in strides]


def output_names(decode: bool, strides=(4, 8, 16, 32)) -> list[str]:
    """The graph's output names: `detections`, or one raw map per level of `strides` (the model's)."""
    return [DECODED_OUTPUT_NAME] if decode else raw_output_names(strides)


def check_image_size(height: int, width: int, dynamic: bool) -> None:
    """Raise ValueError unless H and W are multiples of the largest stride (and >= 64 for a dynamic export)."""
    for side in (height, width):
        if side < MAX_STRIDE or side % MAX_STRIDE:
            raise ValueError(f"image size {side} is not a positive multiple of {MAX_STRIDE} (the largest stride)")
        if dynamic and not 2 * MAX_STRIDE <= side <= MAX_DYNAMIC_SIDE:
            raise ValueError(f"a dynamic export needs its example size in [{2 * MAX_STRIDE}, {MAX_DYNAMIC_SIDE}]")


def export_onnx(
    model: ADYOLOFace,
    path: str | Path,
    height: int,
    width: int | None = None,
    *,
    batch: int = 1,
    dynamic: bool = False,
    decode: bool = True,
    opset: int = DEFAULT_OPSET,
) -> ExportReport:
    """Write `model` (eval mode, CPU) to `path` as ONNX for input [batch, 3, height, width].

    With `dynamic`, batch, height and width are symbolic (height and width multiples of 32, at least 64)
    and the example is traced at batch 2: torch.export specialises a size-1 dimension to a constant.
    """
    width = width or height
    check_image_size(height, width, dynamic)
    model = model.eval()
    deploy = DeployModel(model, decode).eval()
    names = output_names(decode, model.strides)
    dynamic_shapes = None
    if dynamic:
        # Sides as 32 * k: the exporter then knows every feature map is an exact fraction of the input.
        batch_dim = torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)
        rows = torch.export.Dim("rows_32", min=2, max=MAX_DYNAMIC_SIDE // MAX_STRIDE)
        cols = torch.export.Dim("cols_32", min=2, max=MAX_DYNAMIC_SIDE // MAX_STRIDE)
        dynamic_shapes = ({0: batch_dim, 2: MAX_STRIDE * rows, 3: MAX_STRIDE * cols},)
        # torch.export turns a size that is 1 in the example into a constant: trace at batch 2 and at a
        # size where the smallest map (GD: High-GD's ceil(H / high_stride)) is at least 2 x 2.
        batch = 2
        smallest = 2 * model.cfg.coarsest_stride
        height, width = max(height, smallest), max(width, smallest)
    example = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(
            deploy,
            (example,),
            str(path),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_shapes=dynamic_shapes,
            external_data=False,  # one self-contained file (the largest size is ~40 MB, far below 2 GB)
            optimize=True,
            verbose=False,  # its step-by-step progress lines; a failure still raises with the reason
        )
    seconds = time.perf_counter() - start
    input_shape: list[int | str] = ["batch", 3, "height", "width"] if dynamic else [batch, 3, height, width]
    return ExportReport(path, seconds, path.stat().st_size, input_shape, names)


def realish_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """[batch, 3, H, W] in [0, 1]: images of the synthetic face dataset (faces on a cluttered background),
    so the check also sees the activations of a face-like input, not only of noise."""
    import cv2  # imported here: only the check needs the data stack

    from adyolo.data.synthetic import SyntheticConfig, render_image

    side = max(64, height, width)
    cfg = SyntheticConfig(image_size=side, max_face=min(128.0, side / 2), seed=seed)
    images = []
    for i in range(batch):
        bgr, _ = render_image(cfg, "val", i)
        rgb = cv2.cvtColor(cv2.resize(bgr, (width, height), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
        images.append(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    return torch.stack(images)


def check_inputs(batch: int, height: int, width: int, dynamic: bool) -> list[tuple[str, torch.Tensor]]:
    """(label, images [B, 3, H, W]) to compare on: random + real-ish at the export shape; for a dynamic
    export also two other batch sizes at two other sizes (one non-square, one smaller or larger)."""
    noise = torch.Generator().manual_seed(1)
    inputs = [
        ("random", torch.rand(batch, 3, height, width, generator=noise)),
        ("real-ish", realish_images(batch, height, width)),
    ]
    if dynamic:
        other = height - MAX_STRIDE if height - MAX_STRIDE >= 2 * MAX_STRIDE else height + 2 * MAX_STRIDE
        inputs += [
            (
                "random, other batch+size",
                torch.rand(3, 3, height + 2 * MAX_STRIDE, width + MAX_STRIDE, generator=noise),
            ),
            ("real-ish, other batch+size", realish_images(2, other, other, seed=1)),
        ]
    return inputs


def check_onnx(
    model: ADYOLOFace,
    path: str | Path,
    inputs: list[tuple[str, torch.Tensor]],
    decode: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
) -> list[Comparison]:
    """Run the ONNX file in ONNX Runtime (CPU) and `model` in PyTorch on each input; one Comparison each."""
    import onnxruntime as ort  # imported here: export alone does not need it

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    deploy = DeployModel(model.eval(), decode).eval()
    results = []
    for label, images in inputs:
        got = session.run(None, {INPUT_NAME: images.numpy()})
        with torch.no_grad():
            expected = deploy(images)
        expected = [expected] if decode else list(expected)
        max_abs = max_rel = 0.0
        for onnx_out, torch_out in zip(got, expected):
            if tuple(onnx_out.shape) != tuple(torch_out.shape):
                raise AssertionError(f"{label}: ONNX output {onnx_out.shape} != PyTorch {tuple(torch_out.shape)}")
            diff = (torch.from_numpy(onnx_out) - torch_out).abs()
            max_abs = max(max_abs, float(diff.max()))
            max_rel = max(max_rel, float((diff / torch_out.abs().clamp_min(1.0)).max()))
        results.append(Comparison(label, tuple(images.shape), max_abs, max_rel, tolerance))
    return results
