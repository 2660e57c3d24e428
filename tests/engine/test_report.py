"""What a run tells its user: the results table, validation pictures that show misses, the summary, and
an MLflow store that survives being copied."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from adyolo.engine.report import PLOT_EVERY_S, RunReport, read_results
from adyolo.eval.widerface.protocol import PRCurve
from adyolo.layout import DetectionRow
from adyolo.tracking import EXPERIMENT_KIND, Tracker, default_store_uri, relocate_store, rounded
from adyolo.viz import FALSE_COLOUR, FOUND_COLOUR, MISSED_COLOUR, VALIDATION_LONG_SIDE, draw_validation, match_faces
from tests.engine.runs import environment


def detection(x1, y1, x2, y2, score) -> np.ndarray:
    row = np.zeros(16, dtype=np.float32)
    row[DetectionRow.BOX] = [x1, y1, x2, y2]
    row[DetectionRow.SCORE] = score
    row[DetectionRow.LANDMARKS] = np.tile([(x1 + x2) / 2, (y1 + y2) / 2], 5)
    return row


# Three faces (x y w h); a detection on the first, a lower-scoring duplicate of it, one on nothing.
TRUTH = np.array([[10, 10, 20, 20], [60, 10, 10, 10], [10, 60, 12, 12]], dtype=np.float64)
DETECTIONS = np.stack([detection(13, 13, 31, 31, 0.9), detection(14, 14, 32, 32, 0.8), detection(80, 80, 95, 95, 0.7)])


def test_faces_are_matched_as_the_ap_counts_them():
    found, correct = match_faces(DETECTIONS, TRUTH)
    assert found.tolist() == [True, False, False]
    assert correct.tolist() == [True, False, False]  # the duplicate is a false positive, as in the AP
    assert match_faces(DETECTIONS[:0], TRUTH)[0].tolist() == [False] * 3


def test_validation_picture_is_enlarged_and_shows_misses_in_their_own_colour():
    image = np.zeros((100, 120, 3), dtype=np.uint8)
    picture = draw_validation(image, DETECTIONS, TRUTH)
    scale = VALIDATION_LONG_SIDE / 120
    legend = picture.shape[0] - round(100 * scale)
    assert picture.shape[1] == VALIDATION_LONG_SIDE and legend > 0
    body = picture[legend:]

    def colour_at(x, y):
        return tuple(int(c) for c in body[round(y * scale), round(x * scale)])

    assert colour_at(10, 20) == FOUND_COLOUR  # left edge of the found face
    assert colour_at(60, 15) == MISSED_COLOUR  # left edge of a missed face
    assert colour_at(80, 88) == FALSE_COLOUR  # a detection on no face
    assert body[..., 2].max() == 255 and picture[:legend].any()  # the legend line is written


def test_rounded_metrics_lose_float_noise_only():
    assert rounded(0.1 + 0.2) == 0.3 and rounded(123456789.0) == 123457000.0 and rounded(2.5e-7) == 2.5e-7


def report(tmp_path, tracker=None) -> RunReport:
    tracker = tracker or Tracker(False, "", "", tmp_path)
    return RunReport(tracker, tmp_path, "cpu", 2, "ap_hard", num_images=1, ui_command="ui", description="what ran")


def curves() -> dict[str, PRCurve]:
    return {"hard": PRCurve(np.array([1.0, 0.8]), np.array([0.0, 0.5]), np.array([0.9, 0.1]), 0.4)}


def test_results_table_has_a_row_per_epoch_and_a_resumed_epoch_replaces_its_row(tmp_path):
    first = report(tmp_path)
    first.add_step({"box": 0.5, "total": 1.0}, lr=0.01, images_per_s=10.0)
    first.add_step({"box": 0.3, "total": 0.8}, lr=0.01, images_per_s=30.0)
    first.epoch_end(1, step=2, peak_memory_gib=1.25)
    rows = read_results(tmp_path / "results.csv")
    assert len(rows) == 1 and rows[0]["epoch"] == 1 and rows[0]["step"] == 2
    assert rows[0]["loss_box"] == 0.4 and rows[0]["images_per_s"] == 20.0 and rows[0]["peak_memory_gib"] == 1.25
    assert math.isnan(rows[0]["ap_hard"])  # not evaluated this epoch
    # A resumed job reads the table, goes on counting time, and rewrites the epoch it repeats.
    second = report(tmp_path)
    second.add_step({"box": 0.2, "total": 0.4}, lr=0.005, images_per_s=10.0)
    second.evaluation(1, {"ap_easy": 0.5, "ap_medium": 0.4, "ap_hard": 0.3, "map50": 0.2}, True, [], curves())
    second.epoch_end(1, step=3, peak_memory_gib=1.0)
    second.epoch_end(2, step=4, peak_memory_gib=1.0)
    rows = read_results(tmp_path / "results.csv")
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0]["ap_hard"] == 0.3 and rows[0]["loss_box"] == 0.2
    assert rows[1]["time_s"] >= rows[0]["time_s"] >= 0
    assert (tmp_path / "results.png").stat().st_size > 0 and not list(tmp_path.glob(".*.tmp"))
    # A job resumed after the last evaluation still reports it, from the table.
    weights = {"best": tmp_path / "best.pt", "last": tmp_path / "last.pt"}
    summary = report(tmp_path).finish(1, 0.3, weights)
    assert "best  epoch   1: ap_easy 0.5000 ap_medium 0.4000 ap_hard 0.3000 map50 0.2000" in summary
    assert "last  epoch   1: ap_easy 0.5000" in summary and summary.startswith("trained in")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full (every write: ENOSPC)")
def test_a_disk_that_fills_after_the_checkpoint_costs_report_files_not_the_run(tmp_path, capsys):
    """The report's files are written after the checkpoint (which every rank agrees on, exit 74 when the
    disk is full): one that meets a full disk is warned about once, the run goes on. Each file here is
    a link to /dev/full, where every write fails as on a full disk."""
    image = tmp_path / "data" / "img0.jpg"
    image.parent.mkdir()
    cv2.imwrite(str(image), np.full((100, 120, 3), 80, dtype=np.uint8))
    run = report(tmp_path)
    run.add_step({"box": 0.5, "total": 1.0}, lr=0.01, images_per_s=10.0)
    run.epoch_end(1, step=1, peak_memory_gib=1.0)
    table = (tmp_path / "results.csv").read_text()
    full = [tmp_path / ".results.csv.tmp", tmp_path / "results.png", *(run.pictures(2) / n for n in FILES)]
    run.pictures(2).mkdir(parents=True)
    (tmp_path / "results.png").unlink()
    for path in full:
        path.symlink_to("/dev/full")
    metrics = {"ap_easy": 0.5, "ap_medium": 0.4, "ap_hard": 0.3, "map50": 0.2}
    run.add_step({"box": 0.4, "total": 0.9}, lr=0.01, images_per_s=10.0)
    run.evaluation(2, metrics, True, [(str(image), DETECTIONS, TRUTH)], curves())
    run.epoch_end(2, step=2, peak_memory_gib=1.0)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "could not write the pictures of epoch 2" in warnings[0], warnings
    assert "No space left on device" in warnings[0] and "stops at the next checkpoint if the disk" in warnings[0]
    assert (tmp_path / "results.csv").read_text() == table  # the table before, whole
    assert not (tmp_path / ".results.csv.tmp").exists()  # no partial table left behind
    for path in full:  # space freed
        path.unlink(missing_ok=True)
    run.add_step({"box": 0.3, "total": 0.8}, lr=0.01, images_per_s=10.0)
    run.evaluation(3, metrics, False, [(str(image), DETECTIONS, TRUTH)], curves())
    run.epoch_end(3, step=3, peak_memory_gib=1.0)
    assert [r["epoch"] for r in read_results(tmp_path / "results.csv")] == [1, 2, 3]
    assert read_results(tmp_path / "results.csv")[1]["ap_hard"] == 0.3  # epoch 2's row was kept for this write
    assert (tmp_path / "results.png").stat().st_size > 0 and (run.pictures(3) / "val_img0.jpg").stat().st_size > 0


FILES = ("pr_curve.png", "val_img0.jpg")


def test_results_png_is_redrawn_after_evaluations_and_otherwise_at_most_every_minute(tmp_path):
    run = report(tmp_path)
    png = tmp_path / "results.png"
    run.add_step({"box": 0.5, "total": 1.0}, lr=0.01, images_per_s=10.0)
    run.epoch_end(1, step=1, peak_memory_gib=1.0)
    drawn = png.stat().st_mtime_ns
    run.epoch_end(2, step=2, peak_memory_gib=1.0)  # seconds later, not evaluated: the table only
    assert png.stat().st_mtime_ns == drawn and len(read_results(tmp_path / "results.csv")) == 2
    run.evaluation(3, {"ap_easy": 0.5, "ap_medium": 0.4, "ap_hard": 0.3, "map50": 0.2}, True, [], curves())
    run.epoch_end(3, step=3, peak_memory_gib=1.0)
    assert png.stat().st_mtime_ns > drawn
    drawn = png.stat().st_mtime_ns
    run._plotted_at -= PLOT_EVERY_S  # a minute since the last drawing
    run.epoch_end(4, step=4, peak_memory_gib=1.0)
    assert png.stat().st_mtime_ns > drawn


def test_a_finished_run_logs_best_and_last_with_their_pictures_and_a_summary(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    image = tmp_path / "data" / "img0.jpg"
    image.parent.mkdir()
    cv2.imwrite(str(image), np.full((100, 120, 3), 80, dtype=np.uint8))
    tracker = Tracker(True, default_store_uri(tmp_path), "report", tmp_path, "r")
    run = report(tmp_path, tracker)
    for epoch, ap in ((1, 0.5), (2, 0.7), (3, 0.6)):  # epoch 2 is the best, 3 the last
        for rank, gib in enumerate((1.0 + epoch, 2.0 + epoch)):
            tracker.log_metrics({f"memory/peak_rss_gib/rank{rank}": gib}, step=epoch)
        metrics = {"ap_easy": ap, "ap_medium": ap, "ap_hard": ap, "map50": ap}
        run.evaluation(epoch, metrics, ap == 0.7 or epoch == 1, [(str(image), DETECTIONS, TRUTH)], curves())
        run.epoch_end(epoch, step=epoch, peak_memory_gib=2.0)
    for name in ("best.pt", "last.pt"):
        (tmp_path / name).write_bytes(b"weights")
    weights = {"best": tmp_path / "best.pt", "last": tmp_path / "last.pt"}
    summary = run.finish(2, 0.7, weights)
    tracker.finish()
    assert "best  epoch   2: ap_easy 0.7000" in summary and "last  epoch   3: ap_easy 0.6000" in summary
    assert "rank0 4.00, rank1 5.00" in summary and "MLflow: ui" in summary
    client = MlflowClient(default_store_uri(tmp_path))
    (found,) = client.search_runs([client.get_experiment_by_name("report").experiment_id])
    assert (
        found.data.tags["mlflow.note.content"].startswith("what ran")
        and summary in found.data.tags["mlflow.note.content"]
    )
    assert client.get_experiment_by_name("report").tags.items() >= EXPERIMENT_KIND.items()
    # best/* against the epoch it came from; validation against the epoch.
    assert [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, "best/epoch")] == [(1, 1), (2, 2)]
    assert [m.step for m in client.get_metric_history(found.info.run_id, "val/ap_hard")] == [1, 2, 3]
    run_id = found.info.run_id
    listed = {a.path for folder in ("best", "last", "weights") for a in client.list_artifacts(run_id, folder)}
    expected = {"best/val_img0.jpg", "best/pr_curve.png", "last/pr_curve.png", "weights/best.pt", "weights/last.pt"}
    assert expected <= listed
    top = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"results.csv", "results.png", "memory_by_rank.png", "evaluations"} <= top
    # The pictures logged as best are those of epoch 2's evaluation.
    best = client.download_artifacts(found.info.run_id, "best/val_img0.jpg", str(tmp_path / "down"))
    assert open(best, "rb").read() == (tmp_path / "pictures" / "epoch_002" / "val_img0.jpg").read_bytes()


def test_a_copied_run_folder_keeps_its_artifacts(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    original, copy = tmp_path / "run", tmp_path / "moved" / "run"
    original.mkdir()
    (original / "note.txt").write_text("hello")
    tracker = Tracker(True, default_store_uri(original), "copied", original, "r")
    tracker.log_artifact(original / "note.txt")
    tracker.finish()
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    assert relocate_store(copy) and not relocate_store(copy)  # once; then it already points here
    client = MlflowClient(default_store_uri(copy))
    (found,) = client.search_runs([client.get_experiment_by_name("copied").experiment_id])
    assert found.info.artifact_uri.startswith((copy / "mlartifacts").as_uri())
    assert open(client.download_artifacts(found.info.run_id, "note.txt", str(tmp_path))).read() == "hello"
    # A run resumed in the copied folder (a new process, as a resumed job is) logs into the copy.
    resume = (
        "import sys; from adyolo.tracking import Tracker, default_store_uri;"
        "t = Tracker(True, default_store_uri(sys.argv[1]), 'copied', sys.argv[1], run_id=sys.argv[2]);"
        "t.log_artifact(sys.argv[1] + '/note.txt', 'again'); t.finish()"
    )
    subprocess.run([sys.executable, "-c", resume, str(copy), found.info.run_id], check=True, env=environment())
    assert not original.exists()
    assert [a.path for a in client.list_artifacts(found.info.run_id, "again")] == ["again/note.txt"]


@pytest.fixture(autouse=True)
def _no_active_run():
    yield
    if mlflow.active_run():
        mlflow.end_run()
