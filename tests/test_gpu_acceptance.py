"""The GPU acceptance check's stages (the prepared script a GPU session runs: `pytest -m gpu`, the
benchmark, a short training run, the plan) with the script's own flags at tiny settings on the CPU, so a
renamed flag or key, or an output the script copies that is no longer written, fails here first. The
`pytest -m gpu` stage is `tests/gpu/test_jobs.py`'s."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from adyolo.config import load_run_config
from adyolo.engine.cuda_allocator import ENV, NEWER_ENV
from tests.engine.runs import ROOT, environment

# The script's commands, flag for flag; `TINY_*` shrink the sizes without renaming anything.
BENCH = [
    *("--gpus", "1", "--precision", "bf16", "--global-batch", "40", "--size", "s", "--img", "640"),
    *("--checkpoint", "off", "--fusion", "full,efficient,yolov5face", "--attention", "sdpa,explicit"),
    *("--steps", "4", "--warmup", "2", "--loader", "--workers", "4,8,16", "--no-mlflow"),
]
TINY_BENCH = {
    **{"--global-batch": "2", "--size": "n", "--img": "64", "--steps": "1", "--warmup": "1", "--workers": "0"},
    # Two of the four networks (a row is a fresh process and a trace): attention and the baseline.
    **{"--fusion": "full,yolov5face", "--attention": "explicit"},
}
TRAIN = ["epochs=2", "data.workers=8"]  # with output_dir= and data.synthetic_root=
PLAN = ["--config", "launch/configs/widerface_s.yaml", "--gpus", "1,8", "--gpu-memory-gib", "16,80,141"]
# The baseline's trace is the cheapest: its one variant, checkpointing off / selected / all.
TINY_PLAN = ["model.neck=yolov5face", "model.size=n", "model.img_size=64"]


def _shrunk(command: list[str], values: dict[str, str]) -> list[str]:
    return [values.get(command[i - 1], arg) if i else arg for i, arg in enumerate(command)]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in environment().items() if k not in (ENV, NEWER_ENV)}  # the default allocator
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_the_bench_stage_writes_what_the_script_copies(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        cv2.imwrite(str(images / f"{i}.jpg"), np.full((48, 64, 3), 40 * i, np.uint8))
    out = tmp_path / "bench"
    extra = ["--loader-batches", "1", "--loader-cache", "off", "--data", str(images), "--out", str(out)]
    _run("launch/bench.py", *_shrunk(BENCH, TINY_BENCH), *extra)
    saved = json.loads((out / "bench.json").read_text())
    assert (out / "bench.md").is_file()
    # Each network measured beside the plan's prediction for it.
    assert [(r["fusion"], r["attention"]) for r in saved["rows"]] == [("full", "explicit"), ("yolov5face", "-")]
    for row in saved["rows"]:
        assert "error" not in row and row["precision_resolved"] == "bf16", row
        assert row["predicted_allocated_gib"] > 0 and row["peak_allocated_gib"] > 0
    assert [r["workers"] for r in saved["loader"]] == [0]


def test_the_train_and_plan_stages_take_the_scripts_settings(tmp_path):
    cfg = load_run_config(ROOT / "launch" / "configs" / "default.yaml", [*TRAIN, f"output_dir={tmp_path}"])
    assert cfg.epochs == 2 and cfg.data.workers == 8
    out = tmp_path / "plan"
    proc = _run("launch/plan.py", *PLAN, *TINY_PLAN, "--out", str(out))
    table = (out / "plan.md").read_text()
    assert "| yolov5face | 1 |" in table and "| yolov5face | 8 |" in table and "| 141 GiB |" in table
    assert "# Plan: size n, 64 px, global batch 40, bf16" in proc.stdout
    assert json.loads((out / "plan.json").read_text())["assumptions"]["expandable_segments"] is True
