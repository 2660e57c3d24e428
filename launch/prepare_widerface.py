"""Convert WIDER FACE (RetinaFace annotations) into the project's YOLO-face label format.

    python launch/prepare_widerface.py --src SRC --out OUT
    python launch/prepare_widerface.py --src SRC --out OUT --splits val --gt-mat eval_tools/ground_truth
    python launch/prepare_widerface.py --src SRC --out OUT --copy --workers 16

SRC holds `<split>/label.txt` and `<split>/images/<event>/<name>.jpg` for each split (the RetinaFace
annotations of WIDER FACE). Writes `OUT/<split>/images/<event>/<name>.jpg` (a symlink to the source
image, or a copy with --copy) and `OUT/<split>/labels/<event>/<name>.txt`. With --gt-mat, the four
evaluation .mat files of the eval_tools archive are copied to `OUT/val/ground_truth/` for the official
easy / medium / hard evaluation. Prints a summary per split.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adyolo.data.retinaface import (
    GROUND_TRUTH_DIR_NAME,
    IMAGES_DIR_NAME,
    LABEL_FILE_NAME,
    LAYOUT_HELP,
    RetinaFaceLabelError,
    convert_split,
    copy_ground_truth,
    default_workers,
    find_ground_truth,
)

SPLITS = ("train", "val")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True, help="WIDER FACE folder with <split>/label.txt")
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
    args = parser.parse_args(argv)
    validate_args(parser, args)
    return args


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every check that needs no conversion work, so a mistake fails at once (parser.error exits 2)."""
    args.splits = list(dict.fromkeys(args.splits))  # drop repeats, keep the order given
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    for split in args.splits:
        label_file = args.src / split / LABEL_FILE_NAME
        if not label_file.is_file():
            parser.error(f"{label_file} not found; {LAYOUT_HELP}")
        images_dir = args.src / split / IMAGES_DIR_NAME
        if not images_dir.is_dir():
            parser.error(f"{images_dir} is not a folder; {LAYOUT_HELP}")
    if args.out.resolve() == args.src.resolve():
        parser.error("--out must differ from --src: the output has its own images/ and labels/ folders")
    if args.gt_mat is not None:
        if "val" not in args.splits:
            parser.error("--gt-mat belongs to the val split; add val to --splits")
        try:
            find_ground_truth(args.gt_mat)
        except FileNotFoundError as err:
            parser.error(str(err))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for split in args.splits:
        try:
            summary = convert_split(args.src / split, args.out / split, copy=args.copy, workers=args.workers)
        except RetinaFaceLabelError as err:
            sys.exit(f"error: {err}")
        print(summary.describe())
        if split == "val":
            report_ground_truth(args.gt_mat, args.out / split)
    print(f"dataset written to {args.out}")


def report_ground_truth(gt_dir: Path | None, out_val_dir: Path) -> None:
    if gt_dir is None:
        print(
            "note: no --gt-mat given; evaluation will fall back to size-based difficulty instead of the "
            f"official easy / medium / hard subsets (pass the eval_tools {GROUND_TRUTH_DIR_NAME}/ folder to use them)"
        )
        return
    copies = copy_ground_truth(gt_dir, out_val_dir)
    print(f"val: copied {len(copies)} ground-truth files to {copies[0].parent}")


if __name__ == "__main__":
    main()
