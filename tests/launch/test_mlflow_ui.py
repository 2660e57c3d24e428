"""A trained 2-rank run, read back as a user's MLflow UI reads it: `launch/ui.py` starts the MLflow server
on the run folder (moved after training, as a copied run folder is), and the REST API answers."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from adyolo.engine.phases import PHASES
from tests.engine.runs import LEARNABLE, ROOT, environment, run, train_command

pytestmark = pytest.mark.distributed
EPOCHS, STEPS_PER_EPOCH = 3, 4  # tiny.yaml: 16 images, global batch 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run folder after the move, the training process): 2 processes, ZeRO-2."""
    root = tmp_path_factory.mktemp("ui")
    out = root / "trained"
    command = train_command(out, root / "synthetic", *LEARNABLE, f"epochs={EPOCHS}", launcher="zero2")
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"  # a tiny run lasts seconds, not minutes
    try:
        proc = run(command)
    finally:
        del os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    moved = root / "elsewhere" / "trained"
    moved.parent.mkdir()
    out.rename(moved)  # the store still names the old place
    return moved, proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained):
    """Base URL of `launch/ui.py <run folder>`, and what it printed."""
    port = free_port()
    command = [sys.executable, str(ROOT / "launch" / "ui.py"), str(trained[0]), "--port", str(port)]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment(), start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, "the MLflow server did not start"
            time.sleep(0.5)
        yield base, proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def get(base: str, endpoint: str, **query) -> dict:
    with urllib.request.urlopen(f"{base}{endpoint}?{urllib.parse.urlencode(query)}", timeout=30) as answer:
        return json.loads(answer.read())


def post(base: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{base}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


@pytest.fixture(scope="module")
def mlrun(server):
    base, _ = server
    experiment = get(base, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="adyolo")["experiment"]
    (found,) = post(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    return experiment, found


def history(base: str, run_id: str, key: str) -> list[tuple[int, float]]:
    metrics = get(base, "/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])
    return sorted((int(m["step"]), m["value"]) for m in metrics)


def test_the_run_says_what_ran_and_opens_in_the_training_view(server, mlrun):
    experiment, found = mlrun
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["tags"]
    assert found["info"]["run_name"] == "efficient-n-96px-2cpu-zero2" and found["info"]["status"] == "FINISHED"
    tags = {t["key"]: t["value"] for t in found["data"]["tags"]}
    description = tags["mlflow.note.content"]
    assert "DeepSpeed ZeRO-2 over 2 processes" in description and "best  epoch" in description
    # launch/ui.py says that it re-pointed the moved store, and the run's URL, before the server starts.
    moved, run_line = server[1].stdout.readline(), server[1].stdout.readline()
    assert "artifact locations now point into" in moved
    assert run_line.startswith("run efficient-n-96px-2cpu-zero2:") and found["info"]["run_id"] in run_line


def test_memory_of_every_rank_in_one_section_per_kind(server, mlrun):
    base, (_, found) = server[0], mlrun
    run_id = found["info"]["run_id"]
    keys = {m["key"] for m in found["data"]["metrics"]}
    for kind in ("peak_rss_gib", "rss_gib"):
        for rank in (0, 1):
            series = history(base, run_id, f"memory/{kind}/rank{rank}")
            assert [s for s, _ in series] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
            assert min(v for _, v in series) > 0.1
        assert {f"memory/{kind}/max", f"memory/{kind}/spread"} <= keys
    # Only figures that mean something on a CPU, and no chart that is always 0.
    assert not {k for k in keys if "allocated" in k or "reserved" in k}
    assert not {"train/loss_cls", "train/nonfinite_steps", "train/skipped_images"} & keys
    assert any(k.startswith("system/cpu_utilization") for k in keys), sorted(keys)  # MLflow's system metrics


def test_best_metrics_and_validation_against_the_epoch(server, mlrun):
    base, (_, found) = server[0], mlrun
    run_id = found["info"]["run_id"]
    val = history(base, run_id, "val/ap_hard")
    assert [s for s, _ in val] == [1, 2, 3]
    best = history(base, run_id, "best/epoch")
    best_epoch = int(best[-1][1])
    assert history(base, run_id, "best/ap_hard")[-1] == (best_epoch, dict(val)[best_epoch])
    assert max(v for _, v in val) == dict(val)[best_epoch]


def test_artifacts_of_the_best_and_the_last_weights_reach_the_ui_from_the_moved_folder(server, mlrun):
    base, (_, found) = server[0], mlrun
    run_id = found["info"]["run_id"]

    def listed(path: str = "") -> set[str]:
        files = get(base, "/api/2.0/mlflow/artifacts/list", run_id=run_id, path=path).get("files", [])
        return {f["path"] for f in files}

    assert {"weights/best.pt", "weights/last.pt"} <= listed("weights")
    for folder in ("best", "last"):
        names = listed(folder)
        assert f"{folder}/pr_curve.png" in names and len([n for n in names if n.endswith(".jpg")]) == 2
    assert {"evaluations/epoch_001", "evaluations/epoch_003"} <= listed("evaluations")
    assert {"results.csv", "results.png", "memory_by_rank.png", "config.yaml"} <= listed()
    # The server reads the files themselves from the moved folder.
    url = f"{base}/get-artifact?{urllib.parse.urlencode({'path': 'results.csv', 'run_uuid': run_id})}"
    with urllib.request.urlopen(url, timeout=30) as answer:
        rows = list(csv.DictReader(io.StringIO(answer.read().decode())))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and rows[-1]["step"] == str(EPOCHS * STEPS_PER_EPOCH)
    assert "loss_cls" not in rows[0] and all(float(r["peak_memory_gib"]) > 0.1 for r in rows)


def test_the_terminal_ends_with_a_summary_and_without_known_library_noise(trained):
    out, proc = trained
    text = proc.stdout + proc.stderr
    tail = proc.stdout.strip().splitlines()[-7:]
    assert tail[0].startswith("trained in") and tail[2].startswith("best  epoch")
    assert tail[1].startswith("time by phase (") and all(f" {p} " in tail[1] for p in PHASES + ("other",))
    assert tail[4].startswith("peak rss per rank (GiB): rank0 ") and "rank1" in tail[4]
    assert tail[-1].startswith("MLflow:") and "launch/ui.py" in tail[-1]
    for noise in ("untested optimizer", "all_gather_into_tensor", "Creating initial MLflow database", "; NO"):
        assert noise not in text
    assert text.count("epoch 3: ap_easy") == 1  # once, by the main rank
    # Output to a pipe (as under Slurm or nohup): plain progress lines, at least one per epoch, no redraws.
    assert "\r" not in text
    for epoch in range(1, EPOCHS + 1):
        assert f"epoch {epoch}/{EPOCHS}: 100% {STEPS_PER_EPOCH}/{STEPS_PER_EPOCH} [" in proc.stderr


def test_time_per_phase_of_every_rank(mlrun):
    """The breakdown is logged for the main rank (`time/<phase>_s`, at every epoch end) and per rank at the
    end; the timed phases of a rank add up to at most its wall time."""
    _, found = mlrun
    metrics = {m["key"]: m["value"] for m in found["data"]["metrics"]}
    for rank in ("", "rank0/", "rank1/"):
        times = {p: metrics[f"time/{rank}{p}_s"] for p in (*PHASES, "other", "wall")}
        assert all(times[p] > 0 for p in ("setup", "forward", "loss", "backward", "validation", "checkpoint"))
        assert sum(times[p] for p in PHASES) <= times["wall"] + 1e-6 and times["other"] >= 0
