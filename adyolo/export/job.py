"""Export the EMA weights of best.pt / last.pt to ONNX and check the file: the work behind `launch/export.py`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adyolo.export.onnx import DEFAULT_OPSET, DEFAULT_TOLERANCE, check_image_size, check_inputs, check_onnx, export_onnx
from adyolo.weights import WeightsError, load_weights


class InputError(ValueError):
    """An argument that cannot work; the message names it and the fix."""


@dataclass
class ExportRequest:
    """What `launch/export.py` asks for (its flags, same names)."""

    weights: str
    img: list[int] | None = None  # [H] or [H, W]; None: the size the weights were trained at
    batch: int = 1
    dynamic: bool = False
    decode: bool = True
    opset: int = DEFAULT_OPSET
    out: str | None = None  # None: <weights stem>.onnx beside the weights
    tolerance: float = DEFAULT_TOLERANCE
    check: bool = True
    format: str = "onnx"


def export_weights(request: ExportRequest) -> bool:
    """Export, print what was written, then (unless `check` is off) run ONNX Runtime against PyTorch on
    the same inputs and print each comparison. Returns whether every comparison is within `tolerance`.
    Raises InputError before exporting anything when the weights or the size cannot work."""
    weights = Path(request.weights)
    try:
        model, _config = load_weights(weights, "cpu")
    except WeightsError as err:
        raise InputError(f"--weights {err}") from None
    height, width = (request.img * 2)[:2] if request.img else (model.cfg.img_size, model.cfg.img_size)
    try:
        check_image_size(height, width, request.dynamic)
    except ValueError as err:
        raise InputError(f"--img: {err}") from None
    out = Path(request.out) if request.out else weights.with_suffix(".onnx")

    report = export_onnx(
        model,
        out,
        height,
        width,
        batch=request.batch,
        dynamic=request.dynamic,
        decode=request.decode,
        opset=request.opset,
    )
    shape = "x".join(map(str, report.input_shape))
    print(
        f"exported {report.path} ({report.size_bytes / 2**20:.1f} MiB, {report.seconds:.1f} s): "
        f"{_variant(model.cfg)}, opset {request.opset}, input images {shape}, "
        f"outputs {', '.join(report.output_names)}"
    )
    if not request.check:
        return True
    inputs = check_inputs(request.batch, height, width, request.dynamic)
    results = check_onnx(model, out, inputs, request.decode, request.tolerance)
    for result in results:
        print(result)
    return all(r.passed for r in results)


def _variant(cfg) -> str:
    """The exported detector in words: `efficient fusion`, `full fusion` or `yolov5face neck`."""
    return "yolov5face neck" if cfg.neck == "yolov5face" else f"{cfg.fusion} fusion"
