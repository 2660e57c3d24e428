"""The benchmark (`adyolo.bench`, launch/bench.py): a grid of real training steps on CPU (through
accelerate and DeepSpeed), its reports, and how a row's out-of-memory error, crash or hang becomes a
result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from adyolo.bench import runner, worker
from adyolo.bench.grid import GridError, expand_grid, label, overrides, parse_axes
from adyolo.bench.main import check_rows
from adyolo.bench.report import per_flop_table, target_checks
from adyolo.config import load_run_config
from adyolo.model import ModelConfig, build_model
from adyolo.model.blocks import ConvBN
from adyolo.model.summary import count_gflops, count_parameters, count_training_gflops
from tests.engine.runs import environment

BENCH = Path(__file__).parents[1] / "launch" / "bench.py"


def _bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=timeout, env=environment()
    )


@pytest.mark.distributed
def test_grid_of_two_process_training_steps_with_loader_and_mlflow(tmp_path):
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    for i in range(6):
        cv2.imwrite(str(images / f"{i}.jpg"), np.full((48, 64, 3), 30 * i, np.uint8))
    out = tmp_path / "out"
    proc = _bench(
        *("--size", "n", "--img", "64", "--global-batch", "5", "--gpus", "2"),
        *("--fusion", "efficient", "--attention", "sdpa", "--checkpoint", "off", "--zero", "0,2"),
        *("--warmup", "1", "--steps", "2", "--out", str(out), "--profile"),
        *("--loader", "--workers", "0", "--loader-batches", "2", "--data", str(images)),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = json.loads((out / "bench.json").read_text())
    rows = saved["rows"]
    # Two rows, each in two fresh processes: DDP and ZeRO-2 (the grid's order and the variants' rows
    # are checked without processes in the tests below), 5 images over 2 ranks (3 + 2; at 64 px one image
    # alone cannot train: its smallest map is 1x1).
    assert [label(r) for r in rows] == ["efficient fp32 ckpt=off ddp b5", "efficient fp32 ckpt=off z2 b5"]
    for r in rows:
        assert "error" not in r, r
        assert r["zero_stage"] == (2 if r["zero"] == "2" else 0)
        assert (r["world_size"], r["micro_batches"], r["accumulation"]) == (2, "3/2", 1)
        assert len(r["ranks"]) == 2 and all(rank["peak_allocated_gib"] > 0.1 for rank in r["ranks"])
        assert r["images_per_s"] > 0 and r["ms_per_step"] > 0
        # Every rank's own step time (the row's is the slowest rank's) and its time in gloo collectives,
        # which DDP and ZeRO-2 both need every step.
        assert max(rank["ms_per_step"] for rank in r["ranks"]) == pytest.approx(r["ms_per_step"], rel=1e-4)
        assert all(0 < rank["comm_ms_per_step"] < rank["ms_per_step"] for rank in r["ranks"]), r["ranks"]
    for r in rows:  # the TFLOP/s column rests on the model's own fwd+bwd count at the benchmarked size
        model = build_model(ModelConfig(size="n", fusion=r["fusion"], attention=r["attention"].replace("-", "sdpa")))
        assert r["train_gflops_per_image"] == pytest.approx(count_training_gflops(model, 64))
    assert [(r["workers"], r["cache"]) for r in saved["loader"]] == [(0, False), (0, True)]
    assert all(r["images_per_s"] > 0 for r in saved["loader"])

    report = (out / "bench.md").read_text()
    main_table = report.split("Speed per FLOP:")[0]
    assert main_table.count("| efficient fp32") == 2
    per_flop = report.split("Speed per FLOP:")[1].split("Time per rank")[0]
    assert per_flop.count("| efficient fp32") == 2 and "| 1.00x |" in per_flop
    assert "| 3/2 x 2 x 1 |" in report and "1.00x" in report
    per_rank = report.split("Time per rank")[1].split("Targets:")[0]
    assert per_rank.count("| efficient fp32 ckpt=off z2 b5 |") == 2  # one line per rank
    assert "loader keeps up" in report and "| loader workers | images in RAM (data.cache) | images/s |" in report
    assert (out / "bench.png").stat().st_size > 10_000

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    metrics = run.data.metrics
    # MLflow holds 6 significant digits.
    assert metrics["efficient fp32 ckpt-off z2 b5/images_per_s"] == pytest.approx(rows[1]["images_per_s"], rel=1e-5)
    assert metrics["efficient fp32 ckpt-off ddp b5/rank1/peak_allocated_gib"] > 0.1
    assert metrics["efficient fp32 ckpt-off ddp b5/rank1/comm_ms_per_step"] > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"bench.md", "bench.json", "bench.png"} <= artifacts


@pytest.mark.slow
def test_profile_traces_a_row_and_names_its_costliest_operators_and_inference_is_timed_folded(tmp_path):
    out = tmp_path / "out"
    proc = _bench(
        *("--size", "n", "--img", "64", "--global-batch", "2", "--gpus", "1", "--fusion", "efficient"),
        *("--checkpoint", "off", "--warmup", "1", "--steps", "1", "--out", str(out), "--profile"),
        *("--inference", "--inference-batch", "2"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads((out / "bench.json").read_text())["rows"]
    trace = json.loads(Path(row["trace"]).read_text())
    assert any(event.get("name", "").startswith("aten::") for event in trace["traceEvents"])
    shares = [op["share"] for op in row["top_ops"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    # A convolutional detector: convolutions (forward or backward) are among its costliest operators.
    assert any("conv" in op["op"] for op in row["top_ops"][:5]), row["top_ops"][:5]
    assert all(op["self_ms_per_step"] > 0 and op["calls_per_step"] > 0 for op in row["top_ops"])
    report = (out / "bench.md").read_text()
    assert "Where the time goes" in report and f"| `{row['top_ops'][0]['op']}` |" in report
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (folder,) = client.list_artifacts(run.info.run_id, "profile")
    assert {Path(a.path).name for a in client.list_artifacts(run.info.run_id, folder.path)} == {
        "trace.json",
        "top_ops.txt",
    }

    # The network's eval forward, as loaded and with its Conv-BN pairs folded, timed side by side.
    (inference,) = json.loads((out / "bench.json").read_text())["inference"]
    model = build_model(ModelConfig(size="n", fusion="efficient"))
    assert inference["model"] == "efficient" and inference["batch"] == 2
    assert inference["folded"] == sum(isinstance(m, ConvBN) for m in model.modules())
    assert inference["images_per_s"] > 0 and inference["folded_images_per_s"] > 0
    line = next(line for line in report.splitlines() if line.startswith("| efficient | "))
    assert f"| {inference['folded']} |" in line and line.endswith("x |")
    metric = run.data.metrics["inference/efficient/folded_images_per_s"]
    assert metric == pytest.approx(inference["folded_images_per_s"], rel=1e-5)


def test_inference_only_runs_no_training_row(tmp_path):
    proc = _bench(
        *("--inference-only", "--size", "n", "--img", "64", "--fusion", "yolov5face,efficient"),
        *("--checkpoint", "off", "--inference-batch", "1", "--steps", "1", "--warmup", "0", "--out", str(tmp_path)),
        "--no-mlflow",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"] == [] and not (tmp_path / "rows").exists()
    assert [r["model"] for r in saved["inference"]] == ["yolov5face", "efficient"]
    report = (tmp_path / "bench.md").read_text()
    assert "optimizer steps" not in report and "| yolov5face | " in report and "| efficient | " in report


def test_bad_grid_values_and_config_keys_stop_before_any_row(tmp_path):
    proc = _bench("--attention", "flash", "--out", str(tmp_path), timeout=60)
    assert proc.returncode == 2 and "--attention: unknown 'flash'" in proc.stderr
    proc = _bench("--set", "train.ema_decya=0.9", "--out", str(tmp_path), timeout=60)
    assert proc.returncode == 2 and "ema_decya" in proc.stderr
    proc = _bench("--checkpoint", "all", "--compile", "on", "--out", str(tmp_path), timeout=60)
    assert proc.returncode == 2 and "train.compile: cannot be combined with activation checkpointing" in proc.stderr
    assert not (tmp_path / "rows").exists()


def test_grid_varies_attention_only_for_the_full_variant():
    axes = {
        "global_batch": "40",
        "fusion": "full,efficient",
        "attention": "sdpa,explicit",
        "precision": "bf16",
        "checkpoint": "off,all",
        "zero": "0",
        "channels_last": "off",
        "compile": "off,on",
    }
    rows = expand_grid(parse_axes(axes))
    names = [label(r) for r in rows]
    assert len(rows) == 12 and len(set(names)) == 12  # full: 2 x 2 x 2, efficient: 2 x 2
    assert sum(r["fusion"] == "efficient" for r in rows) == 4
    assert {r["attention"] for r in rows if r["fusion"] == "efficient"} == {"-"}
    assert "full/explicit bf16 ckpt=all ddp compile b40" in names
    with pytest.raises(GridError, match="--zero: unknown '4'; choose from 0, 1, 2, 2_offload, 3"):
        parse_axes({**axes, "zero": "0,4", "global_batch": "40"})
    with pytest.raises(GridError, match="--global-batch takes positive integers, got 40,0"):
        parse_axes({**axes, "zero": "0", "global_batch": "40,0"})


def test_deepspeed_bucket_and_overlap_vary_only_zero_rows_and_reach_their_json(tmp_path):
    axes = {
        "global_batch": "4",
        "fusion": "efficient",
        "attention": "sdpa",
        "precision": "fp32",
        "checkpoint": "off",
        "zero": "0,2",
        "channels_last": "off",
        "compile": "off",
        "bucket": "json,5e6",
        "overlap_comm": "off,on",
    }
    rows = expand_grid(parse_axes(axes))
    names = [label(r) for r in rows]
    # DDP has no DeepSpeed buckets: one row; ZeRO-2: 2 bucket settings x 2 overlap settings.
    assert names == [
        "efficient fp32 ckpt=off ddp b4",
        "efficient fp32 ckpt=off z2 overlap=off b4",
        "efficient fp32 ckpt=off z2 overlap=on b4",
        "efficient fp32 ckpt=off z2 bucket=5e6 overlap=off b4",
        "efficient fp32 ckpt=off z2 bucket=5e6 overlap=on b4",
    ]
    common = {"gpus": 2, "micro_batch": None}
    written = []
    for row in rows[1:]:
        runner.launch_command(row, common, tmp_path)
        written.append(json.loads((tmp_path / "deepspeed.json").read_text())["zero_optimization"])
    stage_file = json.loads((runner.DS_CONFIGS / "zero2.json").read_text())["zero_optimization"]
    assert [z["overlap_comm"] for z in written] == [False, True, False, True]
    assert [z["reduce_bucket_size"] for z in written] == [stage_file["reduce_bucket_size"]] * 2 + [5_000_000] * 2
    assert all(z["allgather_bucket_size"] == z["reduce_bucket_size"] for z in written[2:])
    # The JSON's own settings when the axes are not given (the default, `json`).
    (default,) = expand_grid(parse_axes({**axes, "zero": "2", "bucket": "json", "overlap_comm": "json"}))
    runner.launch_command(default, common, tmp_path)
    assert json.loads((tmp_path / "deepspeed.json").read_text())["zero_optimization"] == stage_file
    assert label(default) == "efficient fp32 ckpt=off z2 b4"
    with pytest.raises(GridError, match="--bucket takes `json` or element counts"):
        parse_axes({**axes, "bucket": "big"})
    with pytest.raises(GridError, match="--overlap-comm: unknown 'yes'"):
        parse_axes({**axes, "overlap_comm": "yes"})


def test_the_yolov5face_baseline_is_a_row_beside_the_gd_variants():
    axes = {
        "global_batch": "2",
        "fusion": "yolov5face,efficient,full",
        "attention": "sdpa",
        "precision": "fp32",
        "checkpoint": "off,all,neck.low_fusion",
        "zero": "0",
        "channels_last": "off",
        "compile": "off",
    }
    rows = expand_grid(parse_axes(axes))
    names = [label(r) for r in rows]
    assert names[:3] == [
        "yolov5face fp32 ckpt=off ddp b2",
        "yolov5face fp32 ckpt=all ddp b2",
        "yolov5face fp32 ckpt=neck.low_fusion ddp b2",
    ]
    assert "efficient fp32 ckpt=off ddp b2" in names and "full/sdpa fp32 ckpt=off ddp b2" in names
    common = {"config": None, "size": "n", "img": 64, "micro_batch": None, "overrides": []}
    baseline = overrides(rows[0], common)
    assert "model.neck=yolov5face" in baseline and not any(
        o.startswith(("model.fusion", "model.attention")) for o in baseline
    )
    assert "model.neck=gd" in overrides(rows[3], common)
    cfg = load_run_config(None, baseline)
    assert (cfg.model.neck, cfg.model.variant, cfg.model.num_levels) == ("yolov5face", "yolov5face", 3)

    invalid = check_rows(rows, common)
    # A GD block name is not a block of the baseline: that row is a result ("invalid"), not an error.
    assert list(invalid) == [2] and "unknown block 'neck.low_fusion' for neck 'yolov5face'" in invalid[2]
    model = build_model(cfg.model)
    assert rows[0]["params_m"] == pytest.approx(count_parameters(model) / 1e6)
    assert rows[0]["train_gflops_per_image"] == pytest.approx(count_training_gflops(model, 64))
    assert rows[0]["gflops_per_image"] == pytest.approx(count_gflops(model, 64))
    gd = next(r for r in rows if r["fusion"] == "efficient")
    assert gd["train_gflops_per_image"] != rows[0]["train_gflops_per_image"]  # one FLOP count per network

    # Speed per FLOP: forward GFLOPs x img/s of each row that ran, relative to the first.
    rows[0]["images_per_s"], gd["images_per_s"] = 4.0, 1.0
    table = per_flop_table(rows).splitlines()
    work = 4.0 * rows[0]["gflops_per_image"], 1.0 * gd["gflops_per_image"]
    assert len(table) == 4 and table[2].startswith("| yolov5face fp32 ckpt=off ddp b2 |") and "| 1.00x |" in table[2]
    assert table[3].startswith("| efficient fp32 ckpt=off ddp b2 |") and f"| {work[1] / work[0]:.2f}x |" in table[3]


def test_an_out_of_memory_rank_records_the_row_as_oom(tmp_path, monkeypatch):
    def exhausted(spec, out):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 23.93 GiB\nmore detail")

    monkeypatch.setattr(worker, "train_steps", exhausted)
    monkeypatch.setenv("RANK", "1")
    assert worker.measure({}, tmp_path) == runner.EXIT_OOM
    result = runner.collect(tmp_path, runner.EXIT_OOM)
    assert result == {"oom": "CUDA out of memory. Tried to allocate 23.93 GiB", "oom_rank": 1}

    def broken(spec, out):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(worker, "train_steps", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):  # not an OOM: a real failure
        worker.measure({}, tmp_path / "other")


def test_a_crashed_or_hung_row_is_reported_with_its_cause(tmp_path, monkeypatch):
    (tmp_path / "log.txt").write_text(
        "[rank0]: Traceback (most recent call last):\n"
        "[rank0]: ValueError: Expected more than 1 value per channel when training\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
    )
    assert runner.collect(tmp_path, 1) == {
        "error": "exit 1: [rank0]: ValueError: Expected more than 1 value per channel when training"
    }
    assert runner.collect(tmp_path, None) == {"error": "timed out"}

    hang = {"fusion": "efficient", "zero": "0"}
    command = [sys.executable, "-c", "import time; time.sleep(60)"]
    monkeypatch.setattr(runner, "launch_command", lambda row, common, row_dir: command)
    result = runner.run_row(hang, {"gpus": 1}, tmp_path / "row", timeout_s=1)
    assert result["error"] == "timed out"


def _row(fusion: str, attention: str, precision: str, images_per_s: float, peak: float, **settings) -> dict:
    row = {
        "global_batch": 40,
        "fusion": fusion,
        "attention": attention,
        "precision": precision,
        "checkpoint": "off",
        "zero": "0",
        "channels_last": False,
        "compile": False,
        **settings,
    }
    return {**row, "images_per_s": images_per_s, "peak_allocated_gib": peak, "peak_reserved_gib": peak + 0.5}


def test_targets_are_read_off_matching_rows():
    rows = [
        _row("full", "sdpa", "bf16", 90.0, 13.0),
        _row("efficient", "-", "bf16", 100.0, 10.0),
        _row("full", "sdpa", "bf16", 60.0, 6.0, checkpoint="all"),
        _row("full", "explicit", "fp32", 30.0, 20.0, global_batch=8),
        _row("efficient", "-", "bf16", 120.0, 3.0, global_batch=8),
    ]
    checks = "\n".join(target_checks(rows, [{"workers": 8, "images_per_s": 110.0}], budget_gib=0.0))
    assert (
        "peak memory <= 1.3x efficient: 1.30x" in checks and "1.30x (full/sdpa bf16 ckpt=off ddp b40) - met" in checks
    )
    assert "img/s >= 0.75x efficient: 0.90x" in checks
    assert "fits 16 GiB: 6.50 GiB reserved" in checks
    assert "2.5x fp32 eager explicit at batch 8: 4.00x (efficient bf16 ckpt=off ddp b8) - met" in checks
    assert "loader keeps up: 110 img/s vs fastest training 120 img/s - NOT met" in checks

    rows[0]["peak_allocated_gib"] = 14.0
    checks = "\n".join(target_checks(rows, [], budget_gib=0.0))
    assert "1.40x (full/sdpa bf16 ckpt=off ddp b40) - NOT met" in checks
    assert "loader" not in checks
