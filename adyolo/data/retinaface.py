"""WIDER FACE in the RetinaFace annotation layout -> the project's YOLO-face labels.

The widely used RetinaFace annotations of WIDER FACE come as one `label.txt` per split:

    SRC/train/label.txt   SRC/train/images/<event>/<name>.jpg
    SRC/val/label.txt     SRC/val/images/<event>/<name>.jpg

A line `# <event>/<name>.jpg` starts an image and the lines after it are its faces, one per line:
`x y w h` (top-left corner and size, pixels), optionally followed by five landmark triplets
`lx ly flag` (left eye, right eye, nose, left mouth corner, right mouth corner) and a trailing score,
20 numbers in all. A missing landmark is `-1.0 -1.0 -1.0`. The val file usually has boxes only.

`convert_split` writes `OUT/<split>/images/...` (symlinks or copies of the source images) and
`OUT/<split>/labels/....txt` in the format of `adyolo.data.labels`, so the dataset finds them through
`label_path_for`. The command-line front end is `launch/prepare_widerface.py`.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from adyolo.data.labels import MISSING, NUM_COLUMNS, label_path_for, write_label_file
from adyolo.layout import NUM_LANDMARKS, LabelRow

LABEL_FILE_NAME = "label.txt"
IMAGES_DIR_NAME = "images"
NUM_POINTS = NUM_LANDMARKS
BOX_ONLY_VALUES = 4  # x y w h
FULL_VALUES = 20  # x y w h, 5 x (lx ly flag), score
# Parsed face: x, y, w, h, then 5 x (lx, ly) in pixels; -1 for a missing landmark point.
FACE_COLUMNS = 4 + 2 * NUM_POINTS
FACE_CLASS = 0
# Files of the `ground_truth/` folder of the WIDER FACE eval_tools archive, used by the official
# evaluation protocol (easy / medium / hard subsets of the val split).
GROUND_TRUTH_FILES = ("wider_face_val.mat", "wider_easy_val.mat", "wider_medium_val.mat", "wider_hard_val.mat")
GROUND_TRUTH_DIR_NAME = "ground_truth"
LAYOUT_HELP = (
    "expected layout: SRC/<split>/label.txt and SRC/<split>/images/<event>/<name>.jpg "
    "(the RetinaFace annotations of WIDER FACE)"
)


class RetinaFaceLabelError(ValueError):
    """A RetinaFace `label.txt` line that cannot be read; the message names `file:line`."""


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
    images_skipped: int = 0  # missing or unreadable image files
    skipped_paths: list[str] = field(default_factory=list)  # relative paths of the skipped images

    def describe(self) -> str:
        """One paragraph for the console."""
        text = (
            f"{self.split}: {self.images} images converted ({self.images_without_faces} without faces), "
            f"{self.faces_written} faces written, {self.faces_dropped} faces dropped (less than 1 px "
            f"after clipping to the image), {self.images_skipped} images skipped (missing or unreadable)"
        )
        if self.skipped_paths:
            shown = ", ".join(self.skipped_paths[:5])
            more = f" and {len(self.skipped_paths) - 5} more" if len(self.skipped_paths) > 5 else ""
            text += f": {shown}{more}"
        return text + "."


# ---------------------------------------------------------------------------------------------------
# Parsing


def parse_retinaface_labels(path: str | Path) -> list[tuple[str, np.ndarray]]:
    """Read one RetinaFace `label.txt`.

    Returns (relative image path, faces) per image in file order; faces is [N, 14] float64:
    x, y, w, h, then 5 x (lx, ly) in pixels, with -1 for a missing landmark point (boxes-only lines
    get all landmarks -1). Raises `RetinaFaceLabelError` naming `path:line` for a malformed file.
    """
    path = Path(path)
    images: list[tuple[str, list[list[float]]]] = []
    first_line_of: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        if text.startswith("#"):
            relative = _parse_image_line(text, path, number)
            if relative in first_line_of:
                raise _error(
                    path,
                    number,
                    f"image {relative!r} is listed again (first at line {first_line_of[relative]})",
                    "list each image once, with all its faces under one '#' line",
                )
            first_line_of[relative] = number
            images.append((relative, []))
            continue
        if not images:
            raise _error(
                path,
                number,
                "a face line before any '# <event>/<name>.jpg' line",
                "start the file with the '#' line of the image the faces belong to",
            )
        images[-1][1].append(_parse_face_line(text, path, number))
    return [(relative, np.array(faces, np.float64).reshape(-1, FACE_COLUMNS)) for relative, faces in images]


def _parse_image_line(text: str, path: Path, number: int) -> str:
    relative = text[1:].strip()
    fix = "write '# <event>/<name>.jpg', the image path relative to the split's images/ folder"
    if not relative:
        raise _error(path, number, "an image line without a path", fix)
    parts = Path(relative).parts
    # The path becomes part of the output path: keep it inside the output folder.
    if Path(relative).is_absolute() or ".." in parts:
        raise _error(path, number, f"image path {relative!r} is not inside the images/ folder", fix)
    return relative


def _parse_face_line(text: str, path: Path, number: int) -> list[float]:
    fields = text.split()
    fix = "fix or delete the line; missing landmarks are written '-1.0 -1.0 -1.0'"
    if len(fields) not in (BOX_ONLY_VALUES, FULL_VALUES):
        raise _error(
            path,
            number,
            f"{len(fields)} values in a face line, expected {BOX_ONLY_VALUES} (x y w h) or {FULL_VALUES} "
            f"(x y w h, 5 landmarks as 'x y flag', score)",
            fix,
        )
    try:
        values = [float(f) for f in fields]
    except ValueError:
        raise _error(path, number, f"not a number in {text!r}", fix) from None
    if not all(math.isfinite(v) for v in values):
        raise _error(path, number, f"non-finite value in {text!r}", fix)
    box = values[:BOX_ONLY_VALUES]
    if len(values) == BOX_ONLY_VALUES:
        return box + [MISSING] * (2 * NUM_POINTS)
    points = []
    for i in range(NUM_POINTS):
        x, y = values[BOX_ONLY_VALUES + 3 * i : BOX_ONLY_VALUES + 3 * i + 2]  # the flag is not needed
        points += [MISSING, MISSING] if x < 0 or y < 0 else [x, y]
    return box + points


def _error(path: Path, number: int, problem: str, fix: str) -> RetinaFaceLabelError:
    return RetinaFaceLabelError(f"{path}:{number}: {problem}; {fix}")


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
) -> SplitSummary:
    """Convert `src_split_dir` (label.txt + images/) into `out_split_dir` (images/ + labels/).

    The whole label.txt is parsed before anything is written, so a malformed file leaves the output
    untouched. Images are processed in sorted order; an image that cannot be read is skipped with an
    `UnreadableImageWarning` (and any output of an earlier run for it removed).
    """
    src_split_dir, out_split_dir = Path(src_split_dir), Path(out_split_dir)
    entries = sorted(parse_retinaface_labels(src_split_dir / LABEL_FILE_NAME), key=lambda entry: entry[0])
    source_images = [src_split_dir / IMAGES_DIR_NAME / relative for relative, _ in entries]
    sizes = read_image_sizes(source_images, default_workers() if workers is None else workers)

    summary = SplitSummary(split=src_split_dir.name)
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


def check_conversion(src: Path, out: Path, splits: list[str], workers: int, gt_dir: Path | None) -> None:
    """Every check that needs no conversion work, so a mistake fails at once: ValueError naming it."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    for split in splits:
        label_file = src / split / LABEL_FILE_NAME
        if not label_file.is_file():
            raise ValueError(f"{label_file} not found; {LAYOUT_HELP}")
        images_dir = src / split / IMAGES_DIR_NAME
        if not images_dir.is_dir():
            raise ValueError(f"{images_dir} is not a folder; {LAYOUT_HELP}")
    if out.resolve() == src.resolve():
        raise ValueError("--out must differ from --src: the output has its own images/ and labels/ folders")
    if gt_dir is not None:
        if "val" not in splits:
            raise ValueError("--gt-mat belongs to the val split; add val to --splits")
        try:
            find_ground_truth(gt_dir)
        except FileNotFoundError as err:
            raise ValueError(str(err)) from None


def prepare_widerface(
    src: Path, out: Path, splits: list[str], copy: bool, workers: int, gt_dir: Path | None = None
) -> None:
    """Check, then convert each split of `src` into `out` (printing a summary per split) and copy the
    official ground truth beside the val split. Raises ValueError (a bad argument, before any work) or
    RetinaFaceLabelError (a malformed label.txt, naming file:line, before that split is written)."""
    splits = list(dict.fromkeys(splits))  # drop repeats, keep the order given
    check_conversion(src, out, splits, workers, gt_dir)
    for split in splits:
        print(convert_split(src / split, out / split, copy=copy, workers=workers).describe())
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
