"""The annotation files WIDER FACE comes with, read into one form: (image path, faces [N, 14]) per image.

Three formats are in common use, each with its own folder layout (SRC is what `--src` names):

official   the WIDER FACE download: `SRC/wider_face_split/wider_face_<split>_bbx_gt.txt`, images in
           `SRC/WIDER_<split>/images/<event>/<name>.jpg`. Per image: its path, a line with the face count,
           then one line per face, `x y w h blur expression illumination invalid occlusion pose` (pixels,
           top-left corner and size, then integer attributes). An image without faces has the count 0 and
           one line of ten zeros. Boxes only: landmarks are written as missing. A face marked `invalid` is
           dropped and counted.
retinaface the RetinaFace annotations: `SRC/<split>/label.txt`, images in `SRC/<split>/images/`. A line
           `# <event>/<name>.jpg` starts an image; each face is `x y w h`, optionally followed by five
           landmarks `lx ly flag` (left eye, right eye, nose, left and right mouth corner; `-1 -1 -1` when
           missing) and a score: 4 or 20 numbers.
scrfd      insightface's SCRFD annotations: `SRC/<split>/labelv2.txt` (or `label.txt`), images in
           `SRC/<split>/images/`. The image line carries its size, `# <event>/<name>.jpg <width> <height>`;
           each face is `x1 y1 x2 y2` (corners), then either nothing, an ignore flag (1: the face is
           dropped and counted) or the five landmark triplets (and a score): 4, 5, 19 or 20 numbers.

`find_annotations` finds a split's file and its format (`detect_format` reads the file's first line when
only its content tells), `parse_annotations` reads it. Anything malformed raises `AnnotationError` naming
`file:line`, what was expected there and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adyolo.layout import NUM_LANDMARKS

FORMATS = ("official", "retinaface", "scrfd")
NUM_POINTS = NUM_LANDMARKS
# Parsed face: x, y, w, h, then 5 x (lx, ly) in pixels; -1 for a missing landmark point.
FACE_COLUMNS = 4 + 2 * NUM_POINTS
MISSING = -1.0
OFFICIAL_VALUES = 10  # x y w h blur expression illumination invalid occlusion pose
OFFICIAL_INVALID = 7  # the column of `invalid`
LANDMARK_VALUES = 3 * NUM_POINTS  # 5 x (x, y, flag)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
FORMAT_HELP = (
    "official: '<event>/<name>.jpg', then the face count, then 'x y w h blur expression illumination invalid "
    "occlusion pose' per face; retinaface: '# <event>/<name>.jpg', then 'x y w h' (+ 5 landmarks 'x y flag' and "
    "a score); scrfd: '# <event>/<name>.jpg <width> <height>', then 'x1 y1 x2 y2' (+ an ignore flag, or 5 "
    "landmarks and a score)"
)


class AnnotationError(ValueError):
    """An annotation line that cannot be read; the message names `file:line`, what was expected and the fix."""


@dataclass
class SplitAnnotations:
    """One split's annotation file, read."""

    path: Path
    format: str
    images_dir: Path  # where the image paths of the file are relative to
    images: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (relative path, faces [N, 14])
    faces_dropped_by_file: int = 0  # official `invalid` faces, SCRFD faces with the ignore flag


# ---------------------------------------------------------------------------------------------------
# Finding and recognising the file


def annotation_candidates(src: Path, split: str) -> list[tuple[Path, Path, str | None]]:
    """(file, its images folder, format or None where the content decides), in the order looked for."""
    official = src / "wider_face_split" / f"wider_face_{split}_bbx_gt.txt"
    return [
        (official, src / f"WIDER_{split}" / "images", "official"),
        (src / split / "labelv2.txt", src / split / "images", None),
        (src / split / "label.txt", src / split / "images", None),
    ]


def find_annotations(src: Path, split: str, fmt: str = "auto") -> tuple[Path, Path, str]:
    """-> (annotation file, images folder, format) of `split` under `src`; ValueError naming what was
    looked for when none is there. `fmt` other than "auto" checks that the file is of that format."""
    for path, images_dir, known in annotation_candidates(src, split):
        if not path.is_file():
            continue
        found = known or detect_format(path)
        if fmt not in ("auto", found):
            raise ValueError(
                f"{path}: --format {fmt}, but the file is in the {found} format ({_first_content(path)!r}); "
                f"pass --format {found} or auto"
            )
        return path, images_dir, found
    looked = ", ".join(str(p) for p, _, _ in annotation_candidates(src, split))
    raise ValueError(f"no annotation file for split {split!r}: looked for {looked}; {layout_help()}")


def layout_help() -> str:
    return (
        "expected layout, one of: SRC/wider_face_split/wider_face_<split>_bbx_gt.txt + "
        "SRC/WIDER_<split>/images/ (official), SRC/<split>/label.txt + SRC/<split>/images/ (RetinaFace), "
        "SRC/<split>/labelv2.txt + SRC/<split>/images/ (SCRFD)"
    )


def detect_format(path: Path) -> str:
    """The format of an annotation file, from its first non-empty line; `AnnotationError` at that line
    when it starts none of them."""
    number, text = _first_content_line(path)
    if text.startswith("#"):
        fields = text[1:].split()
        if len(fields) == 3 and all(_is_int(f) for f in fields[1:]):
            return "scrfd"
        if len(fields) >= 1:
            return "retinaface"
    elif text.lower().endswith(IMAGE_SUFFIXES):
        return "official"
    raise AnnotationError(
        f"{path}:{number}: {text[:80]!r} starts no WIDER FACE annotation format; expected {FORMAT_HELP}"
    )


# ---------------------------------------------------------------------------------------------------
# Parsing


def parse_annotations(path: Path, fmt: str, images_dir: Path) -> SplitAnnotations:
    """Read the whole file (nothing is written before it has been read)."""
    parse = {"official": _parse_official, "retinaface": _parse_retinaface, "scrfd": _parse_scrfd}[fmt]
    annotations = SplitAnnotations(Path(path), fmt, Path(images_dir))
    parse(annotations, Path(path).read_text(encoding="utf-8").splitlines())
    return annotations


def _parse_official(out: SplitAnnotations, lines: list[str]) -> None:
    path = out.path
    seen: dict[str, int] = {}
    i = 0
    while i < len(lines):
        text = lines[i].strip()
        if not text:
            i += 1
            continue
        number = i + 1
        relative = _image_path(text, path, number, "write the image path, relative to WIDER_<split>/images/")
        _check_new(relative, seen, path, number)
        i += 1
        count_text = lines[i].strip() if i < len(lines) else ""
        if not _is_int(count_text) or int(count_text) < 0:
            raise _error(path, i + 1, f"expected the face count of {relative!r}, found {count_text!r}", "write it")
        count = int(count_text)
        i += 1
        faces = []
        for _ in range(max(count, 1)):
            fields = lines[i].split() if i < len(lines) else []
            if count == 0:
                # An image without faces: one line of ten zeros follows (absent in some copies).
                if len(fields) == OFFICIAL_VALUES and all(_is_float(f) and float(f) == 0 for f in fields):
                    i += 1
                break
            values = _numbers(
                fields, OFFICIAL_VALUES, path, i + 1, "x y w h blur expression illumination invalid occlusion pose"
            )
            i += 1
            if values[OFFICIAL_INVALID] == 1:
                out.faces_dropped_by_file += 1
                continue
            faces.append(values[:4] + [MISSING] * (2 * NUM_POINTS))
        out.images.append((relative, _faces(faces)))


def _parse_retinaface(out: SplitAnnotations, lines: list[str]) -> None:
    def header(text: str, path: Path, number: int) -> str:
        return _image_path(text[1:].strip(), path, number, "write '# <event>/<name>.jpg'")

    def face(fields: list[str], path: Path, number: int) -> list[float] | None:
        if len(fields) not in (4, 4 + LANDMARK_VALUES + 1):
            raise _error(
                path,
                number,
                f"{len(fields)} values in a face line, expected 4 (x y w h) or 20 (x y w h, 5 landmarks as "
                "'x y flag', score)",
                "fix or delete the line; missing landmarks are written '-1.0 -1.0 -1.0'",
            )
        values = _numbers(fields, len(fields), path, number, "numbers")
        return values[:4] + _points(values[4 : 4 + LANDMARK_VALUES])

    _parse_hash_headed(out, lines, header, face)


def _parse_scrfd(out: SplitAnnotations, lines: list[str]) -> None:
    def header(text: str, path: Path, number: int) -> str:
        fields = text[1:].split()
        fix = "write '# <event>/<name>.jpg <width> <height>'"
        if len(fields) != 3 or not all(_is_int(f) and int(f) > 0 for f in fields[1:]):
            raise _error(path, number, f"{text!r} is not an image line with its size", fix)
        return _image_path(fields[0], path, number, fix)

    def face(fields: list[str], path: Path, number: int) -> list[float] | None:
        if len(fields) not in (4, 5, 4 + LANDMARK_VALUES, 4 + LANDMARK_VALUES + 1):
            raise _error(
                path,
                number,
                f"{len(fields)} values in a face line, expected 4 (x1 y1 x2 y2), 5 (+ an ignore flag), 19 "
                "(+ 5 landmarks as 'x y flag') or 20 (+ a score)",
                "fix or delete the line; missing landmarks are written '-1 -1 -1'",
            )
        values = _numbers(fields, len(fields), path, number, "numbers")
        if len(values) == 5 and values[4] == 1:
            out.faces_dropped_by_file += 1
            return None
        x1, y1, x2, y2 = values[:4]
        points = _points(values[4 : 4 + LANDMARK_VALUES]) if len(values) >= 4 + LANDMARK_VALUES else _points([])
        return [x1, y1, x2 - x1, y2 - y1] + points

    _parse_hash_headed(out, lines, header, face)


def _parse_hash_headed(out: SplitAnnotations, lines: list[str], header, face) -> None:
    """The RetinaFace / SCRFD layout: `#` image lines, each followed by its face lines."""
    path = out.path
    seen: dict[str, int] = {}
    images: list[tuple[str, list[list[float]]]] = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        if text.startswith("#"):
            relative = header(text, path, number)
            _check_new(relative, seen, path, number)
            images.append((relative, []))
            continue
        if not images:
            raise _error(
                path,
                number,
                "a face line before any '# <event>/<name>.jpg' line",
                "start the file with the '#' line of the image the faces belong to",
            )
        parsed = face(text.split(), path, number)
        if parsed is not None:
            images[-1][1].append(parsed)
    out.images.extend((relative, _faces(faces)) for relative, faces in images)


# ---------------------------------------------------------------------------------------------------
# Pieces


def _image_path(relative: str, path: Path, number: int, fix: str) -> str:
    if not relative:
        raise _error(path, number, "an image line without a path", fix)
    parts = Path(relative).parts
    # The path becomes part of the output path: keep it inside the output folder.
    if Path(relative).is_absolute() or ".." in parts:
        raise _error(path, number, f"image path {relative!r} is not inside the images/ folder", fix)
    return relative


def _check_new(relative: str, seen: dict[str, int], path: Path, number: int) -> None:
    if relative in seen:
        raise _error(
            path,
            number,
            f"image {relative!r} is listed again (first at line {seen[relative]})",
            "list each image once, with all its faces",
        )
    seen[relative] = number


def _numbers(fields: list[str], expected: int, path: Path, number: int, what: str) -> list[float]:
    text = " ".join(fields)
    fix = "fix or delete the line"
    if len(fields) != expected:
        raise _error(path, number, f"{len(fields)} values in {text!r}, expected {expected} ({what})", fix)
    try:
        values = [float(f) for f in fields]
    except ValueError:
        raise _error(path, number, f"not a number in {text!r}", fix) from None
    if not all(math.isfinite(v) for v in values):
        raise _error(path, number, f"non-finite value in {text!r}", fix)
    return values


def _points(triplets: list[float]) -> list[float]:
    """5 x (x, y, flag) -> 10 coordinates, -1 where a point is missing (a negative coordinate)."""
    if not triplets:
        return [MISSING] * (2 * NUM_POINTS)
    points = []
    for i in range(NUM_POINTS):
        x, y = triplets[3 * i : 3 * i + 2]  # the flag is not needed
        points += [MISSING, MISSING] if x < 0 or y < 0 else [x, y]
    return points


def _faces(faces: list[list[float]]) -> np.ndarray:
    return np.array(faces, np.float64).reshape(-1, FACE_COLUMNS)


def _first_content_line(path: Path) -> tuple[int, str]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                return number, line.strip()
    raise AnnotationError(f"{path}:1: the file is empty; expected {FORMAT_HELP}")


def _first_content(path: Path) -> str:
    return _first_content_line(path)[1][:60]


def _is_int(text: str) -> bool:
    return text.isdigit()


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _error(path: Path, number: int, problem: str, fix: str) -> AnnotationError:
    return AnnotationError(f"{path}:{number}: {problem}; {fix}")
