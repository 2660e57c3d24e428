"""launch/bench.py runs its grid on CPU and reports every row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

BENCH = Path(__file__).parents[1] / "launch" / "bench.py"


def test_bench_grid_on_cpu(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--device",
            "cpu",
            "--size",
            "n",
            "--img",
            "96",
            "--batch",
            "2",
            "--variants",
            "full/sdpa,efficient",
            "--checkpoint",
            "off,on",
            "--warmup",
            "0",
            "--steps",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(r["variant"], r["checkpoint"]) for r in rows] == [
        ("full/sdpa", False),
        ("full/sdpa", True),
        ("efficient", False),
        ("efficient", True),
    ]
    for r in rows:
        assert r["ms_per_step"] > 0 and r["images_per_s"] > 0 and r["peak_rss_gib"] > 0
        assert r["gflops_per_image"] > 0 and r["params_m"] > 0
    table = (tmp_path / "bench.md").read_text()
    assert table.count("| full/sdpa |") == 2 and table.count("| efficient |") == 2
    assert "1.00x" in table  # ratios against the first row


def test_bench_rejects_unknown_variant(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--variants", "full/flash", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown 'full/flash'" in proc.stderr


def test_loader_bench_reports_each_worker_count(tmp_path):
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    for i in range(6):
        cv2.imwrite(str(images / f"{i}.jpg"), np.full((48, 64, 3), 30 * i, np.uint8))
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--loader",
            "--workers",
            "0,1",
            "--img",
            "64",
            "--batch",
            "2",
            "--batches",
            "2",
            "--data",
            str(images),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["loader"]
    assert [r["workers"] for r in rows] == [0, 1] and all(r["images_per_s"] > 0 for r in rows)
