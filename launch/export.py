"""Export the EMA weights of best.pt / last.pt to ONNX, then check the file against PyTorch.

    python launch/export.py --weights runs/default/best.pt                      # -> runs/default/best.onnx
    python launch/export.py --weights best.pt --img 640 --dynamic --out face.onnx
    python launch/export.py --weights best.pt --no-decode                       # the 4 raw head maps

Graph input `images` float32 [B, 3, H, W], RGB / 255. Output `detections` float32 [B, N, 15 + C]:
cx, cy, w, h, objectness, 5 landmark (x, y) in input pixels, class scores (apply a score threshold and
NMS); with --no-decode the outputs are `p2`..`p5` [B, 3, H/s, W/s, 15 + C], s = 4, 8, 16, 32. A fixed
export has the shape of --batch and --img; --dynamic takes any batch and any H, W multiple of 32 (>= 64).

After export, ONNX Runtime and PyTorch run the same inputs (random and a synthetic face image at the export
size; with --dynamic also two other batch sizes at two other sizes) and the largest error is printed.
Exit codes: 0 exported and within tolerance, 1 the check failed, 2 bad weights or arguments.
"""

from __future__ import annotations

import argparse
import sys

from adyolo.export.job import ExportRequest, InputError, export_weights
from adyolo.export.onnx import DEFAULT_OPSET, DEFAULT_TOLERANCE


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="best.pt or last.pt of a run (EMA weights + config)")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="export format (only onnx)")
    parser.add_argument("--img", type=int, nargs="+", help="H [W] in pixels, multiples of 32 (default: model.img_size)")
    parser.add_argument("--batch", type=int, default=1, help="batch of a fixed export (default 1)")
    parser.add_argument("--dynamic", action="store_true", help="symbolic batch, height and width")
    parser.add_argument(
        "--decode",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include the head decode: one output [B, N, 15 + C] in pixels (default); --no-decode: 4 raw maps",
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--out", help="output file (default: next to the weights, <weights stem>.onnx)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"largest |onnx - torch| / max(|torch|, 1) the check accepts (default {DEFAULT_TOLERANCE:.0e})",
    )
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the ONNX Runtime check")
    args = parser.parse_args()
    if args.img is not None and len(args.img) > 2:
        parser.error("--img takes H or H W")
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    return args


def main() -> int:
    args = parse_args()
    try:
        passed = export_weights(ExportRequest(**vars(args)))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not passed:
        print(f"error: ONNX Runtime and PyTorch disagree by more than {args.tolerance:.0e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
