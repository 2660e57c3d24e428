"""The three WIDER FACE annotation formats: found, recognised and converted, on small hand-written files that
follow each format's definition (the official `*_bbx_gt.txt`, RetinaFace's `label.txt`, SCRFD's `labelv2.txt`),
and one-line errors naming file:line for anything else."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from adyolo.data.labels import read_label_file
from adyolo.data.retinaface import prepare_widerface
from adyolo.data.widerface_formats import AnnotationError, detect_format, find_annotations, parse_annotations

REPO_ROOT = Path(__file__).resolve().parents[2]
SIZES = {"0--Parade/0_Parade_marchingband_1_5.jpg": (96, 80), "1--Handshaking/1_Handshaking_b_2.jpg": (64, 48)}

# The same faces in each format. Image 1: a face with landmarks (the official format has none), a face
# without, and a face the file itself excludes (official: invalid = 1; SCRFD: ignore flag 1). Image 2: none.
# The official lines end with a space, as in the WIDER FACE download.
OFFICIAL_LINES = [
    "0--Parade/0_Parade_marchingband_1_5.jpg",
    "3",
    "10 12 30 40 0 0 0 0 0 0 ",
    "50 8 20 24 2 0 1 0 1 1 ",
    "60 50 6 6 0 0 0 1 0 0 ",
    "1--Handshaking/1_Handshaking_b_2.jpg",
    "0",
    "0 0 0 0 0 0 0 0 0 0 ",
]
OFFICIAL = "\n".join(OFFICIAL_LINES) + "\n"
LANDMARKS = "15.0 20.0 0.0 30.0 21.0 0.0 25.0 30.0 1.0 18.0 40.0 0.0 32.0 41.0 0.0"
RETINAFACE = f"""# 0--Parade/0_Parade_marchingband_1_5.jpg
10 12 30 40 {LANDMARKS} 0.93
50 8 20 24
# 1--Handshaking/1_Handshaking_b_2.jpg
"""
SCRFD = f"""# 0--Parade/0_Parade_marchingband_1_5.jpg 96 80
10.000 12.000 40.000 52.000 {LANDMARKS} 0.93
50.000 8.000 70.000 32.000 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0
60.000 50.000 66.000 56.000 1
# 1--Handshaking/1_Handshaking_b_2.jpg 64 48
"""


def write_images(folder: Path) -> None:
    for relative, (width, height) in SIZES.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), np.full((height, width, 3), 128, np.uint8))


def layout(root: Path, fmt: str, split: str = "train") -> Path:
    """SRC in `fmt`'s own layout, holding `split`."""
    if fmt == "official":
        (root / "wider_face_split").mkdir(parents=True)
        (root / "wider_face_split" / f"wider_face_{split}_bbx_gt.txt").write_text(OFFICIAL)
        write_images(root / f"WIDER_{split}" / "images")
    else:
        (root / split).mkdir(parents=True)
        name, text = ("label.txt", RETINAFACE) if fmt == "retinaface" else ("labelv2.txt", SCRFD)
        (root / split / name).write_text(text)
        write_images(root / split / "images")
    return root


def labels_of(out: Path, relative: str) -> np.ndarray:
    return read_label_file(out / "train" / "labels" / Path(relative).with_suffix(".txt")).labels


@pytest.mark.parametrize("fmt", ["official", "retinaface", "scrfd"])
def test_each_format_is_found_and_converted(tmp_path, fmt, capsys):
    src = layout(tmp_path / "src", fmt)
    out = tmp_path / "out"
    prepare_widerface(src, out, ["train"], copy=False, workers=1)
    printed = capsys.readouterr().out
    assert f"train: {fmt} annotations" in printed and "train: 2 images converted (1 without faces), 2 faces" in printed
    excluded = ", 1 faces marked invalid or ignored in the annotations dropped"
    assert (excluded in printed) == (fmt != "retinaface")

    first, second = SIZES
    labels = labels_of(out, first)
    scale = np.array([96, 80, 96, 80])
    np.testing.assert_allclose(labels[:, 1:5] * scale, [[25, 32, 30, 40], [60, 20, 20, 24]], rtol=1e-5)
    if fmt == "official":
        assert (labels[:, 5:] == -1).all()  # boxes only
    else:
        np.testing.assert_allclose(labels[0, 5:7] * [96, 80], [15, 20], rtol=1e-5)
        assert (labels[1, 5:] == -1).all()
    assert labels_of(out, second).shape == (0, 15)
    assert (out / "train" / "images" / second).is_symlink()


def test_the_three_formats_of_the_same_boxes_give_the_same_label_files(tmp_path):
    outputs = {}
    for fmt in ("official", "retinaface", "scrfd"):
        src = layout(tmp_path / fmt, fmt)
        prepare_widerface(src, tmp_path / f"out-{fmt}", ["train"], copy=False, workers=1)
        outputs[fmt] = labels_of(tmp_path / f"out-{fmt}", next(iter(SIZES)))
    np.testing.assert_array_equal(outputs["official"][:, :5], outputs["retinaface"][:, :5])
    np.testing.assert_array_equal(outputs["scrfd"], outputs["retinaface"])


def test_the_format_is_read_from_the_file(tmp_path):
    for name, text, expected in (("a.txt", OFFICIAL, "official"), ("b.txt", RETINAFACE, "retinaface")):
        (tmp_path / name).write_text("\n" + text)
        assert detect_format(tmp_path / name) == expected
    # A SCRFD file named label.txt (as some copies name it) is still SCRFD.
    src = tmp_path / "scrfd_as_label"
    (src / "val").mkdir(parents=True)
    (src / "val" / "label.txt").write_text(SCRFD)
    assert find_annotations(src, "val") == (src / "val" / "label.txt", src / "val" / "images", "scrfd")


def test_official_attributes_and_empty_images(tmp_path):
    path = tmp_path / "wider_face_val_bbx_gt.txt"
    # An empty image whose line of zeros is missing (some copies), then one with two faces.
    path.write_text("0--Parade/x.jpg\n0\n0--Parade/y.jpg\n2\n1 2 3 4 0 0 0 0 0 0\n5 6 7 8 0 0 0 1 0 0\n")
    parsed = parse_annotations(path, "official", tmp_path)
    assert [(rel, len(faces)) for rel, faces in parsed.images] == [("0--Parade/x.jpg", 0), ("0--Parade/y.jpg", 1)]
    assert parsed.faces_dropped_by_file == 1
    np.testing.assert_array_equal(parsed.images[1][1][0], [1, 2, 3, 4] + [-1] * 10)


@pytest.mark.parametrize(
    ("fmt", "content", "line", "expected"),
    [
        ("official", "a/x.jpg\ntwo\n", 2, "expected the face count of 'a/x.jpg', found 'two'"),
        ("official", "a/x.jpg\n2\n1 2 3 4 0 0 0 0 0 0\n", 4, r"0 values in '', expected 10 \(x y w h blur"),
        ("official", "a/x.jpg\n1\n1 2 3 4 0 0 0 0 0\n", 3, "9 values"),
        ("official", "a/x.jpg\n0\n../up.jpg\n0\n", 3, "image path .*is not inside"),
        ("scrfd", "# a/x.jpg 96\n", 1, "'# a/x.jpg 96' is not an image line with its size"),
        ("scrfd", "# a/x.jpg 96 80\n1 2 3 4 5 6\n", 2, "6 values in a face line, expected 4 .x1 y1 x2 y2."),
        ("scrfd", "# a/x.jpg 96 80\n1 2 3 nan\n", 2, "non-finite"),
        ("retinaface", "# a/x.jpg\n1 2 3\n", 2, "3 values in a face line"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, fmt, content, line, expected):
    path = tmp_path / "annotations.txt"
    path.write_text(content)
    with pytest.raises(AnnotationError, match=rf"annotations\.txt:{line}: {expected}") as caught:
        parse_annotations(path, fmt, tmp_path)
    assert "\n" not in str(caught.value)


def test_anything_else_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "label.txt"
    path.write_text("\n\nimage,x,y,w,h\nparty.jpg,1,2,3,4\n")
    with pytest.raises(AnnotationError, match=r"label\.txt:3: 'image,x,y,w,h' starts no WIDER FACE annotation"):
        detect_format(path)


def test_a_format_that_does_not_match_the_file_is_refused(tmp_path):
    src = layout(tmp_path / "src", "scrfd")
    with pytest.raises(ValueError, match=r"--format retinaface, but the file is in the scrfd format"):
        prepare_widerface(src, tmp_path / "out", ["train"], copy=False, workers=1, fmt="retinaface")
    assert not (tmp_path / "out").exists()


def test_cli_official_layout_and_format_flag(tmp_path):
    src = layout(tmp_path / "src", "official", split="val")
    script = REPO_ROOT / "launch" / "prepare_widerface.py"
    command = [sys.executable, str(script), "--src", str(src), "--out", str(tmp_path / "out"), "--splits", "val"]
    result = subprocess.run([*command, "--format", "official"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "val: official annotations" in result.stdout and "val: 2 images converted" in result.stdout
    assert (tmp_path / "out" / "val" / "labels" / "0--Parade" / "0_Parade_marchingband_1_5.txt").is_file()

    (src / "wider_face_split" / "wider_face_val_bbx_gt.txt").write_text("a/x.jpg\n1\n1 2 3\n")
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "wider_face_val_bbx_gt.txt:3: 3 values" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
