"""WIDER FACE annotations -> the project's YOLO-face labels.

WIDER FACE is annotated in three common formats (the official `wider_face_split/*_bbx_gt.txt`, the
RetinaFace `label.txt`, insightface's SCRFD `labelv2.txt`), each with its own folder layout;
`adyolo.data.widerface_formats` finds and reads them. `convert_split` writes `OUT/<split>/images/...`
(symlinks or copies of the source images) and `OUT/<split>/labels/....txt` in the format of
`adyolo.data.labels`, so the dataset finds them through `label_path_for`. The command-line front end is
`launch/prepare_widerface.py`.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from adyolo.data.labels import MISSING, NUM_COLUMNS, label_path_for, write_label_file
from adyolo.data.widerface_formats import (
    FACE_COLUMNS,
    FORMATS,
    NUM_POINTS,
    AnnotationError,
    SplitAnnotations,
    find_annotations,
    layout_help,
    parse_annotations,
)
from adyolo.layout import LabelRow

LABEL_FILE_NAME = "label.txt"
IMAGES_DIR_NAME = "images"
FACE_CLASS = 0
# Files of the `ground_truth/` folder of the WIDER FACE eval_tools archive, used by the official
# evaluation protocol (easy / medium / hard subsets of the val split).
GROUND_TRUTH_FILES = ("wider_face_val.mat", "wider_easy_val.mat", "wider_medium_val.mat", "wider_hard_val.mat")
GROUND_TRUTH_DIR_NAME = "ground_truth"
# A line of an annotation file that cannot be read (the name the RetinaFace-only converter gave it).
RetinaFaceLabelError = AnnotationError


class UnreadableImageWarning(UserWarning):
    """An image listed in `label.txt` is missing or cannot be decoded; it is skipped."""


@dataclass
class SplitSummary:
    """What `convert_split` did with one split."""

    split: str
    images: int = 0  # images converted (a label file written, possibly empty)
    images_without_faces: int = 0
    faces_written: int = 0
    faces_dropped: int = 0  # clipped to less than 1 px wide or high
    faces_dropped_by_file: int = 0  # marked invalid (official) or ignored (SCRFD) in the annotations
    images_skipped: int = 0  # missing or unreadable image files
    skipped_paths: list[str] = field(default_factory=list)  # relative paths of the skipped images

    def describe(self) -> str:
        """One paragraph for the console."""
        text = (
            f"{self.split}: {self.images} images converted ({self.images_without_faces} without faces), "
            f"{self.faces_written} faces written, {self.faces_dropped} faces dropped (less than 1 px "
            f"after clipping to the image), {self.images_skipped} images skipped (missing or unreadable)"
        )
        if self.faces_dropped_by_file:
            text += f", {self.faces_dropped_by_file} faces marked invalid or ignored in the annotations dropped"
        if self.skipped_paths:
            shown = ", ".join(self.skipped_paths[:5])
            more = f" and {len(self.skipped_paths) - 5} more" if len(self.skipped_paths) > 5 else ""
            text += f": {shown}{more}"
        return text + "."


# ---------------------------------------------------------------------------------------------------
# Parsing


def parse_retinaface_labels(path: str | Path) -> list[tuple[str, np.ndarray]]:
    """Read one RetinaFace `label.txt`: (relative image path, faces [N, 14] float64: x, y, w, h, then
    5 x (lx, ly) pixels, -1 for a missing point) per image in file order. Raises `AnnotationError`
    naming `path:line` for a malformed file."""
    path = Path(path)
    return parse_annotations(path, "retinaface", path.parent / IMAGES_DIR_NAME).images


# ---------------------------------------------------------------------------------------------------
# Conversion of one image's faces


def to_yolo_rows(faces: np.ndarray, width: int, height: int) -> tuple[np.ndarray, int]:
    """Parsed faces [N, 14] (pixels) -> (YOLO-face rows [K, 15] float32, number of faces dropped).

    Boxes are clipped to the image; a face whose clipped width or height is below 1 px is dropped.
    Landmarks are normalised but not clipped (a point just outside the image is still information);
    a point with a negative coordinate is missing and written -1.
    """
    faces = np.asarray(faces, np.float64).reshape(-1, FACE_COLUMNS)
    x1 = np.clip(faces[:, 0], 0, width)
    y1 = np.clip(faces[:, 1], 0, height)
    # Clip the far corner, not the size: the size is relative to the unclipped corner.
    x2 = np.clip(faces[:, 0] + faces[:, 2], 0, width)
    y2 = np.clip(faces[:, 1] + faces[:, 3], 0, height)
    keep = (x2 - x1 >= 1) & (y2 - y1 >= 1)
    x1, y1, x2, y2, points = x1[keep], y1[keep], x2[keep], y2[keep], faces[keep, 4:]

    rows = np.empty((len(x1), NUM_COLUMNS), np.float64)  # `LabelRow`, normalised
    rows[:, LabelRow.CLASS] = FACE_CLASS
    rows[:, LabelRow.CENTRE] = np.stack([(x1 + x2) / 2 / width, (y1 + y2) / 2 / height], axis=1)
    rows[:, LabelRow.SIZE] = np.stack([(x2 - x1) / width, (y2 - y1) / height], axis=1)
    points = points.reshape(-1, NUM_POINTS, 2)
    missing = (points < 0).any(axis=-1)
    normalised = points / np.array([width, height], np.float64)
    normalised[missing] = MISSING
    rows[:, LabelRow.LANDMARKS] = normalised.reshape(-1, 2 * NUM_POINTS)
    return rows.astype(np.float32), int((~keep).sum())


# ---------------------------------------------------------------------------------------------------
# Conversion of one split


def read_image_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) of an image, or None when it is missing or cannot be decoded."""
    if not Path(path).is_file():
        return None  # checked here so that OpenCV does not log its own warning for every missing file
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        return None
    return image.shape[1], image.shape[0]


def read_image_sizes(paths: list[Path], workers: int) -> list[tuple[int, int] | None]:
    """`read_image_size` for every path, in the order given; decoding runs in `workers` processes."""
    if workers <= 1 or len(paths) <= 1:
        return [read_image_size(p) for p in paths]
    # spawn, not fork: the caller may hold threads (torch, cv2) that a forked child would inherit broken.
    context = multiprocessing.get_context("spawn")
    chunk_size = max(1, min(64, len(paths) // (4 * workers)))
    with context.Pool(min(workers, len(paths))) as pool:
        return pool.map(read_image_size, paths, chunksize=chunk_size)


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def convert_split(
    src_split_dir: str | Path,
    out_split_dir: str | Path,
    copy: bool = False,
    workers: int | None = None,
    annotations: SplitAnnotations | None = None,
) -> SplitSummary:
    """Convert one split into `out_split_dir` (images/ + labels/): the given `annotations`, or else the
    RetinaFace `src_split_dir/label.txt` with its images in `src_split_dir/images/`.

    The whole annotation file is parsed before anything is written, so a malformed file leaves the output
    untouched. Images are processed in sorted order; an image that cannot be read is skipped with an
    `UnreadableImageWarning` (and any output of an earlier run for it removed).
    """
    src_split_dir, out_split_dir = Path(src_split_dir), Path(out_split_dir)
    if annotations is None:
        label_file = src_split_dir / LABEL_FILE_NAME
        annotations = parse_annotations(label_file, "retinaface", src_split_dir / IMAGES_DIR_NAME)
    entries = sorted(annotations.images, key=lambda entry: entry[0])
    source_images = [annotations.images_dir / relative for relative, _ in entries]
    sizes = read_image_sizes(source_images, default_workers() if workers is None else workers)

    summary = SplitSummary(split=src_split_dir.name, faces_dropped_by_file=annotations.faces_dropped_by_file)
    for (relative, faces), source_image, size in zip(entries, source_images, sizes, strict=True):
        out_image = out_split_dir / IMAGES_DIR_NAME / relative
        out_label = label_path_for(out_image)
        if size is None:
            warnings.warn(
                f"{source_image}: missing or not a readable image; skipped", UnreadableImageWarning, stacklevel=2
            )
            out_image.unlink(missing_ok=True)
            out_label.unlink(missing_ok=True)
            summary.images_skipped += 1
            summary.skipped_paths.append(relative)
            continue
        rows, dropped = to_yolo_rows(faces, *size)
        write_label_file(out_label, rows)
        place_image(source_image, out_image, copy)
        summary.images += 1
        summary.images_without_faces += int(len(rows) == 0)
        summary.faces_written += len(rows)
        summary.faces_dropped += dropped
    return summary


def place_image(source: Path, destination: Path, copy: bool) -> None:
    """Copy `source` to `destination`, or link it there (absolute target, so the link survives moves
    of the output folder). Replaces whatever an earlier run left."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.is_symlink() or destination.exists():
        destination.unlink()
    if copy:
        shutil.copy2(source, destination)
    else:
        destination.symlink_to(source.resolve())


# ---------------------------------------------------------------------------------------------------
# Ground truth for the official evaluation


def find_ground_truth(gt_dir: str | Path) -> list[Path]:
    """The four WIDER FACE evaluation .mat files in `gt_dir`; FileNotFoundError names any missing."""
    gt_dir = Path(gt_dir)
    paths = [gt_dir / name for name in GROUND_TRUTH_FILES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"missing WIDER FACE ground truth: {', '.join(missing)}; pass the '{GROUND_TRUTH_DIR_NAME}/' "
            f"folder of the eval_tools archive, which holds {', '.join(GROUND_TRUTH_FILES)}"
        )
    return paths


def copy_ground_truth(gt_dir: str | Path, out_val_dir: str | Path) -> list[Path]:
    """Copy the four evaluation .mat files to `out_val_dir/ground_truth/`; returns the copies."""
    target_dir = Path(out_val_dir) / GROUND_TRUTH_DIR_NAME
    target_dir.mkdir(parents=True, exist_ok=True)
    copies = []
    for source in find_ground_truth(gt_dir):
        copies.append(Path(shutil.copy2(source, target_dir / source.name)))
    return copies


# ---------------------------------------------------------------------------------------------------
# The whole conversion (launch/prepare_widerface.py)


def check_conversion(
    src: Path, out: Path, splits: list[str], workers: int, gt_dir: Path | None, fmt: str = "auto"
) -> dict[str, tuple[Path, Path, str]]:
    """Every check that needs no conversion work, so a mistake fails at once: ValueError naming it.
    Returns per split its (annotation file, images folder, format)."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if fmt not in ("auto", *FORMATS):
        raise ValueError(f"--format {fmt}: use auto or one of {', '.join(FORMATS)}")
    sources = {}
    for split in splits:
        label_file, images_dir, found = find_annotations(src, split, fmt)
        if not images_dir.is_dir():
            raise ValueError(f"{images_dir} is not a folder (the images of {label_file}); {layout_help()}")
        sources[split] = (label_file, images_dir, found)
    if out.resolve() == src.resolve():
        raise ValueError("--out must differ from --src: the output has its own images/ and labels/ folders")
    if gt_dir is not None:
        if "val" not in splits:
            raise ValueError("--gt-mat belongs to the val split; add val to --splits")
        try:
            find_ground_truth(gt_dir)
        except FileNotFoundError as err:
            raise ValueError(str(err)) from None
    return sources


def prepare_widerface(
    src: Path,
    out: Path,
    splits: list[str],
    copy: bool,
    workers: int,
    gt_dir: Path | None = None,
    fmt: str = "auto",
) -> None:
    """Check, then convert each split of `src` into `out` (printing a summary per split) and copy the
    official ground truth beside the val split. `fmt`: the annotation format, or "auto" (found from the
    layout and the file). Raises ValueError (a bad argument, before any work) or AnnotationError (a
    malformed annotation file, naming file:line, before that split is written)."""
    splits = list(dict.fromkeys(splits))  # drop repeats, keep the order given
    sources = check_conversion(src, out, splits, workers, gt_dir, fmt)
    for split in splits:
        label_file, images_dir, found = sources[split]
        print(f"{split}: {found} annotations {label_file} (images in {images_dir})")
        annotations = parse_annotations(label_file, found, images_dir)
        print(convert_split(src / split, out / split, copy, workers, annotations).describe())
        if split != "val":
            continue
        if gt_dir is None:
            print(
                "note: no --gt-mat given; evaluation will fall back to size-based difficulty instead of the "
                f"official easy / medium / hard subsets (pass the eval_tools {GROUND_TRUTH_DIR_NAME}/ folder)"
            )
        else:
            copies = copy_ground_truth(gt_dir, out / split)
            print(f"val: copied {len(copies)} ground-truth files to {copies[0].parent}")
    print(f"dataset written to {out}")
