"""Convert WIDER FACE, in any of its common annotation formats, into the project's YOLO-face label format.

    python launch/prepare_widerface.py --src SRC --out OUT
    python launch/prepare_widerface.py --src SRC --out OUT --splits val --gt-mat eval_tools/ground_truth
    python launch/prepare_widerface.py --src SRC --out OUT --format scrfd --copy --workers 16

SRC holds, per split, one of (the format is found from the layout and the file, or named by --format):
  official    wider_face_split/wider_face_<split>_bbx_gt.txt and WIDER_<split>/images/ (the download)
  retinaface  <split>/label.txt and <split>/images/ (RetinaFace's annotations, with landmarks)
  scrfd       <split>/labelv2.txt and <split>/images/ (insightface SCRFD's: image size, corner boxes)
Writes `OUT/<split>/images/<event>/<name>.jpg` (a symlink to the source image, or a copy with --copy)
and `OUT/<split>/labels/<event>/<name>.txt` (landmarks missing where the format has none). With --gt-mat, the four
evaluation .mat files of the eval_tools archive are copied to `OUT/val/ground_truth/` for the official
easy / medium / hard evaluation. Prints a summary per split.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adyolo.data.retinaface import default_workers, prepare_widerface
from adyolo.data.widerface_formats import FORMATS

SPLITS = ("train", "val")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True, help="WIDER FACE folder (one of the layouts above)")
    parser.add_argument("--format", choices=("auto", *FORMATS), default="auto", help="annotation format")
    parser.add_argument("--out", type=Path, required=True, help="output dataset folder")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS), help="splits to convert")
    parser.add_argument("--copy", action="store_true", help="copy the images instead of symlinking them")
    parser.add_argument(
        "--gt-mat",
        type=Path,
        metavar="DIR",
        help="eval_tools ground_truth/ folder; its .mat files are copied to OUT/val/ground_truth/",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="processes reading image sizes (default: min(8, CPU count))",
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    try:
        prepare_widerface(args.src, args.out, args.splits, args.copy, args.workers, args.gt_mat, args.format)
    except ValueError as err:  # a bad argument, or a malformed annotation file (file:line)
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
