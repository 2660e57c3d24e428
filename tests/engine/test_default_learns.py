"""The whole pipeline learns: the embedded default, trained for a few minutes on CPU, detects faces."""

from __future__ import annotations

import pytest

from .runs import history, mlflow_run, run, train_command

pytestmark = pytest.mark.slow


def test_synthetic_default_reaches_a_high_ap(tmp_path):
    out = tmp_path / "default"
    # The default config (launch/configs/default.yaml), shortened to 10 epochs, evaluated at the end. Its
    # memory plan (a cold trace of 1-2 minutes here) is tested elsewhere.
    overrides = ["epochs=10", "train.eval_interval=10", "log.memory_plan=false"]
    command = train_command(out, tmp_path / "synthetic", *overrides, config=None)
    proc = run(command, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, mlrun = mlflow_run(out)
    ap_hard = history(client, mlrun, "val/ap_hard")
    assert list(ap_hard) == [10] and ap_hard[10] >= 0.5, ap_hard  # validation is charted against the epoch
    assert mlrun.data.metrics["val/map50"] >= 0.5 and mlrun.data.metrics["best/epoch"] == 10
    assert (out / "best.pt").exists() and (out / "pictures" / "epoch_010" / "pr_curve.png").exists()
