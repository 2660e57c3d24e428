"""A tracking server (`MLFLOW_TRACKING_URI=http://...`) that is down when a tiny CPU run starts, and a real
`mlflow server` killed while it trains. docs/reliability.md's fault matrix lists these cases."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from adyolo.engine.report import read_results
from adyolo.schema import ConfigError
from adyolo.tracking import check_tracking_server, default_store_uri

from .runs import environment, finish, latest, one_line_error, run, start, train_command, wait_for

pytestmark = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_that_does_not_answer_is_named_before_anything_starts(tmp_path, monkeypatch):
    nobody = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", nobody)
    with pytest.raises(ConfigError) as refused:
        check_tracking_server(None, tmp_path)
    message = str(refused.value)
    assert message.startswith(f"MLFLOW_TRACKING_URI: the MLflow tracking server {nobody} does not answer (")
    assert (
        f"unset MLFLOW_TRACKING_URI to log into the run folder's own store ({default_store_uri(tmp_path)})" in message
    )
    with pytest.raises(ConfigError, match=r"^log.tracking_uri: .*set log.tracking_uri=sqlite:///"):
        check_tracking_server(nobody, tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    check_tracking_server(None, tmp_path)  # the folder's own store: nothing to ask


def test_a_tracking_server_down_at_start_or_gone_mid_run(tmp_path):
    synthetic = tmp_path / "synthetic"
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 's.db'}",
        ]
        + ["--default-artifact-root", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
        + ["--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=environment(),
        start_new_session=True,
    )
    try:
        # While the server starts: a run pointed at a port where nothing listens stops in seconds (MLflow's
        # own retries took 4 min 15 s), with the way out.
        nobody = f"http://127.0.0.1:{free_port()}"
        began = time.monotonic()
        down = run(train_command(tmp_path / "down", synthetic), timeout=120, MLFLOW_TRACKING_URI=nobody)
        assert down.returncode == 2 and time.monotonic() - began < 120
        one_line_error(down, f"MLFLOW_TRACKING_URI: the MLflow tracking server {nobody} does not answer")
        assert not (tmp_path / "down").exists()

        uri = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while not answers(uri):
            assert server.poll() is None and time.time() < deadline, "the MLflow server did not start"
            time.sleep(0.5)
        out = tmp_path / "run"
        training = start(train_command(out, synthetic, "epochs=3"), MLFLOW_TRACKING_URI=uri)
        wait_for(training, "epoch 2/")
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the server and its workers, gone mid-run
        server.wait()
    code, stdout, stderr = finish(training)
    assert code == 0, stderr[-3000:]
    warnings = [line for line in stderr.splitlines() if "warning" in line.lower() or "Traceback" in line]
    assert len(warnings) == 1 and f"the MLflow tracking server {uri} stopped answering" in warnings[0], warnings
    assert "training goes on without it: results.csv, results.png and the checkpoints" in warnings[0]
    assert [row["epoch"] for row in read_results(out / "results.csv")] == [1, 2, 3]
    assert latest(out) == "step-00000012" and (out / "best.pt").is_file() and (out / "last.pt").is_file()
    assert f"MLflow: {uri} (run " in stdout  # the summary still says where the run's charts are
    # What the server took before it went is in its store; the run stays RUNNING there.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 's.db'}")
    (found,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert found.info.status == "RUNNING" and found.data.metrics["train/loss_total"] > 0


def answers(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False
