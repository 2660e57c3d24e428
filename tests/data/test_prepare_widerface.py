"""WIDER FACE (RetinaFace annotations) -> YOLO-face labels: parsing, conversion, the CLI.

Fixtures are tiny images written with cv2 and hand-written label.txt files in tmp_path.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from adyolo.data.labels import label_path_for, read_label_file
from adyolo.data.retinaface import (
    GROUND_TRUTH_FILES,
    RetinaFaceLabelError,
    UnreadableImageWarning,
    convert_split,
    copy_ground_truth,
    parse_retinaface_labels,
    to_yolo_rows,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "launch" / "prepare_widerface.py"

# Image "party/a.jpg" (96 x 80): two faces, the second without its right eye.
FACE_A1 = "10.0 12.0 30.0 40.0 15.0 20.0 0.0 30.0 21.0 0.0 25.0 30.0 1.0 18.0 40.0 0.0 32.0 41.0 0.0 0.93"
FACE_A2 = "50.0 8.0 20.0 24.0 55.0 14.0 0.0 -1.0 -1.0 -1.0 60.0 20.0 0.0 56.0 26.0 0.0 64.0 26.0 0.0 0.81"
TRAIN_LABELS = f"# party/a.jpg\n{FACE_A1}\n{FACE_A2}\n# street/b.jpg\n"
SIZES = {"party/a.jpg": (96, 80), "street/b.jpg": (64, 48)}


def write_image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), image)


def make_split(root: Path, labels: str, sizes: dict[str, tuple[int, int]]) -> Path:
    """A RetinaFace split folder: label.txt and images/<relative> of the given (width, height)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "label.txt").write_text(labels)
    for relative, (width, height) in sizes.items():
        write_image(root / "images" / relative, width, height)
    return root


def expected_pixels(line: str) -> np.ndarray:
    """cx, cy, w, h and 5 x (x, y) in pixels from a face line lying inside its image; NaN if missing."""
    values = [float(v) for v in line.split()]
    x, y, w, h = values[:4]
    points = []
    for i in range(5):
        px, py = values[4 + 3 * i : 6 + 3 * i]
        points += [np.nan, np.nan] if px < 0 else [px, py]
    return np.array([x + w / 2, y + h / 2, w, h, *points])


def to_pixels(labels: np.ndarray, width: int, height: int) -> np.ndarray:
    pixels = labels[:, 1:].astype(np.float64) * np.array([width, height] * 7)
    pixels[:, 4:][labels[:, 5:] == -1] = np.nan
    return pixels


def test_round_trip_train_split(tmp_path):
    source = make_split(tmp_path / "src" / "train", TRAIN_LABELS, SIZES)
    out = tmp_path / "out" / "train"
    # Two workers: the multiprocessing path is the one real runs take.
    summary = convert_split(source, out, copy=False, workers=2)

    assert (summary.images, summary.faces_written, summary.faces_dropped, summary.images_skipped) == (2, 2, 0, 0)
    assert summary.images_without_faces == 1
    image_a = out / "images" / "party" / "a.jpg"
    labels = read_label_file(label_path_for(image_a)).labels
    assert labels.shape == (2, 15) and (labels[:, 0] == 0).all()
    expected = np.stack([expected_pixels(FACE_A1), expected_pixels(FACE_A2)])
    np.testing.assert_allclose(to_pixels(labels, *SIZES["party/a.jpg"]), expected, rtol=1e-4)
    assert (labels[1, 7:9] == -1).all() and (labels[1, 5:7] != -1).all()  # only the right eye is missing

    image_b = out / "images" / "street" / "b.jpg"
    assert label_path_for(image_b).read_text() == ""
    for relative in SIZES:
        link = out / "images" / relative
        assert link.is_symlink() and link.resolve() == (source / "images" / relative).resolve()
        assert cv2.imread(str(link)) is not None


def test_copy_option_copies_images(tmp_path):
    source = make_split(tmp_path / "src" / "train", TRAIN_LABELS, SIZES)
    out = tmp_path / "out" / "train"
    convert_split(source, out, copy=True, workers=1)
    copied = out / "images" / "party" / "a.jpg"
    assert copied.is_file() and not copied.is_symlink()
    assert copied.read_bytes() == (source / "images" / "party" / "a.jpg").read_bytes()


def test_results_do_not_depend_on_workers_or_reruns(tmp_path):
    sizes = {f"e{i % 3}/img{i}.jpg": (40 + i, 30 + i) for i in range(7)}
    labels = "".join(f"# {relative}\n2 3 10 12\n" for relative in reversed(list(sizes)))
    source = make_split(tmp_path / "src" / "val", labels, sizes)
    serial = convert_split(source, tmp_path / "serial", workers=1)
    parallel = convert_split(source, tmp_path / "parallel", workers=3)
    again = convert_split(source, tmp_path / "parallel", workers=3)  # over the earlier output
    assert serial == parallel == again
    for relative in sizes:
        label = Path("labels", relative).with_suffix(".txt")
        assert (tmp_path / "serial" / label).read_text() == (tmp_path / "parallel" / label).read_text()


def test_val_boxes_only_get_missing_landmarks(tmp_path):
    source = make_split(tmp_path / "src" / "val", "# a/v.jpg\n4 5 20 16\n30 2 8 9\n", {"a/v.jpg": (50, 40)})
    summary = convert_split(source, tmp_path / "out" / "val", workers=1)
    assert summary.split == "val" and summary.faces_written == 2
    labels = read_label_file(tmp_path / "out" / "val" / "labels" / "a" / "v.txt").labels
    assert (labels[:, 5:] == -1).all()
    np.testing.assert_allclose(labels[0, 1:5] * [50, 40, 50, 40], [14, 13, 20, 16], rtol=1e-4)


def test_parse_accepts_both_line_lengths_and_keeps_file_order(tmp_path):
    path = tmp_path / "label.txt"
    path.write_text(f"# z/last.jpg\n1 2 3 4\n\n# a/first.jpg\n{FACE_A2}\n# m/none.jpg\n")
    parsed = parse_retinaface_labels(path)
    assert [relative for relative, _ in parsed] == ["z/last.jpg", "a/first.jpg", "m/none.jpg"]
    assert [faces.shape for _, faces in parsed] == [(1, 14), (1, 14), (0, 14)]
    np.testing.assert_array_equal(parsed[0][1][0], [1, 2, 3, 4] + [-1] * 10)
    np.testing.assert_array_equal(parsed[1][1][0, 4:8], [55, 14, -1, -1])


def test_boxes_are_clipped_and_empty_ones_dropped():
    width, height = 64, 48
    missing = [-1.0] * 10
    faces = np.array(
        [
            [-10, 5, 30, 20, *missing],  # past the left edge
            [50, 30, 30, 30, 70, 40, 60, -5, *([-1.0] * 6)],  # past the right and bottom edges
            [10, 10, 0, 12, *missing],  # zero width
            [100, 10, 10, 10, *missing],  # wholly outside
            [20, 47.5, 10, 10, *missing],  # half a pixel high once clipped
        ],
        np.float64,
    )
    rows, dropped = to_yolo_rows(faces, width, height)
    assert dropped == 3 and rows.shape == (2, 15) and rows.dtype == np.float32
    scale = np.array([width, height, width, height])
    np.testing.assert_allclose(rows[0, 1:5] * scale, [10, 15, 20, 20], rtol=1e-6)
    # Clipping the far corner, not the size (the bug of the original converter would keep w=30, h=30).
    np.testing.assert_allclose(rows[1, 1:5] * scale, [57, 39, 14, 18], rtol=1e-6)
    # A landmark outside the image is kept as it is; one with a negative coordinate is missing.
    np.testing.assert_allclose(rows[1, 5:7] * [width, height], [70, 40], rtol=1e-6)
    assert (rows[1, 7:] == -1).all()


def test_conversion_counts_dropped_faces(tmp_path):
    labels = "# a/x.jpg\n-10 5 30 20\n10 10 0 12\n4 4 8 8\n"
    source = make_split(tmp_path / "src" / "train", labels, {"a/x.jpg": (64, 48)})
    summary = convert_split(source, tmp_path / "out" / "train", workers=1)
    assert (summary.faces_written, summary.faces_dropped) == (2, 1)
    assert "1 faces dropped" in summary.describe()


@pytest.mark.parametrize(
    ("content", "line", "expected"),
    [
        ("# a/x.jpg\n1 2 3 4\n1 2 3 4 5\n", 3, "5 values"),
        ("# a/x.jpg\n\n1 2 three 4\n", 3, "not a number"),
        ("1 2 3 4\n# a/x.jpg\n", 1, "before any"),
        ("# a/x.jpg\n1 2 nan 4\n", 2, "non-finite"),
        ("#\n", 1, "without a path"),
        ("# ../escape.jpg\n", 1, "not inside"),
        ("# a/x.jpg\n# a/x.jpg\n", 2, "listed again"),
    ],
)
def test_malformed_label_file_names_file_and_line(tmp_path, content, line, expected):
    path = tmp_path / "label.txt"
    path.write_text(content)
    with pytest.raises(RetinaFaceLabelError, match=rf"label\.txt:{line}: .*{expected}") as caught:
        parse_retinaface_labels(path)
    assert isinstance(caught.value, ValueError)
    assert str(path) in str(caught.value)


def test_malformed_label_file_writes_nothing(tmp_path):
    source = make_split(tmp_path / "src" / "train", "# a/x.jpg\n1 2 3\n", {"a/x.jpg": (20, 20)})
    with pytest.raises(RetinaFaceLabelError):
        convert_split(source, tmp_path / "out" / "train", workers=1)
    assert not (tmp_path / "out").exists()


def test_unreadable_and_missing_images_are_skipped(tmp_path):
    labels = f"# party/a.jpg\n{FACE_A1}\n# bad/garbage.jpg\n1 1 5 5\n# bad/absent.jpg\n"
    source = make_split(tmp_path / "src" / "train", labels, {"party/a.jpg": SIZES["party/a.jpg"]})
    (source / "images" / "bad").mkdir()
    (source / "images" / "bad" / "garbage.jpg").write_bytes(b"\x00not an image\xff" * 10)
    out = tmp_path / "out" / "train"
    with pytest.warns(UnreadableImageWarning) as caught:
        summary = convert_split(source, out, workers=2)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2 and "absent.jpg" in messages[0] and "garbage.jpg" in messages[1]
    assert (summary.images, summary.images_skipped, summary.faces_written) == (1, 2, 1)
    assert summary.skipped_paths == ["bad/absent.jpg", "bad/garbage.jpg"]
    assert not (out / "labels" / "bad").exists() and not (out / "images" / "bad").exists()
    assert (out / "labels" / "party" / "a.txt").is_file()


def test_copy_ground_truth(tmp_path):
    gt_dir = tmp_path / "ground_truth"
    gt_dir.mkdir()
    for name in GROUND_TRUTH_FILES:
        (gt_dir / name).write_bytes(name.encode())
    copies = copy_ground_truth(gt_dir, tmp_path / "out" / "val")
    assert [c.name for c in copies] == list(GROUND_TRUTH_FILES)
    for name in GROUND_TRUTH_FILES:
        assert (tmp_path / "out" / "val" / "ground_truth" / name).read_bytes() == name.encode()
    (gt_dir / "wider_hard_val.mat").unlink()
    with pytest.raises(FileNotFoundError, match="wider_hard_val.mat"):
        copy_ground_truth(gt_dir, tmp_path / "elsewhere")


# ---------------------------------------------------------------------------------------------------
# The command line


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def widerface(tmp_path) -> Path:
    src = tmp_path / "WIDER"
    make_split(src / "train", TRAIN_LABELS, SIZES)
    make_split(src / "val", "# party/c.jpg\n3 4 10 10\n", {"party/c.jpg": (32, 32)})
    return src


def test_cli_end_to_end(widerface, tmp_path):
    out = tmp_path / "yolo"
    result = run_cli("--src", widerface, "--out", out, "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "train: 2 images converted" in result.stdout and "2 faces written" in result.stdout
    assert "val: 1 images converted" in result.stdout and "size-based difficulty" in result.stdout
    assert read_label_file(out / "train" / "labels" / "party" / "a.txt").labels.shape == (2, 15)
    assert (out / "val" / "labels" / "party" / "c.txt").is_file()
    assert (out / "val" / "images" / "party" / "c.jpg").is_symlink()


def test_cli_missing_label_file(tmp_path):
    (tmp_path / "WIDER" / "train").mkdir(parents=True)
    result = run_cli("--src", tmp_path / "WIDER", "--out", tmp_path / "yolo", "--splits", "train")
    assert result.returncode != 0
    assert str(tmp_path / "WIDER" / "train" / "label.txt") in result.stderr and "expected layout" in result.stderr
    assert not (tmp_path / "yolo").exists()


def test_cli_ground_truth(widerface, tmp_path):
    gt_dir = tmp_path / "eval_tools" / "ground_truth"
    gt_dir.mkdir(parents=True)
    for name in GROUND_TRUTH_FILES[:-1]:
        (gt_dir / name).write_bytes(b"mat")
    out = tmp_path / "yolo"
    result = run_cli("--src", widerface, "--out", out, "--splits", "val", "--gt-mat", gt_dir)
    assert result.returncode != 0 and GROUND_TRUTH_FILES[-1] in result.stderr
    assert not out.exists()  # checked before any work

    (gt_dir / GROUND_TRUTH_FILES[-1]).write_bytes(b"mat")
    result = run_cli("--src", widerface, "--out", out, "--splits", "val", "--gt-mat", gt_dir, "--copy")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / "val" / "ground_truth").iterdir()) == sorted(GROUND_TRUTH_FILES)
    assert not (out / "train").exists()
    assert not (out / "val" / "images" / "party" / "c.jpg").is_symlink()


def test_cli_malformed_label_file(widerface, tmp_path):
    (widerface / "val" / "label.txt").write_text("# party/c.jpg\n3 4 10\n")
    result = run_cli("--src", widerface, "--out", tmp_path / "yolo", "--splits", "val")
    assert result.returncode != 0
    assert "label.txt:2" in result.stderr and "Traceback" not in result.stderr
