"""A tiny detector trained once per test session: what evaluate, detect and export are tested on."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.runs import LEARNABLE, run, train_command


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """Run directory of a finished 12-epoch tiny run (size n, efficient, 96 px; about 20 s): best.pt,
    last.pt, and the synthetic data it used under `<run>/../synthetic/data` (train/ and val/ folders).

    12 epochs at lr 0.005 separate it from an untrained detector (val ap_easy about
    0.3 vs 0.004 at conf 0.001; 4 epochs do not). It is evaluated once, at the end, so that best.pt is
    the trained EMA: with scores still below the validation threshold (0.02) every evaluation ties at
    ap_hard 0 and best.pt would stay the first epoch's weights."""
    root = tmp_path_factory.mktemp("trained")
    out, synthetic = root / "run", root / "synthetic" / "data"
    command = train_command(out, synthetic, *LEARNABLE, "epochs=12", "optim.lr=0.005", "train.eval_interval=12")
    proc = run(command, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "best.pt").is_file()
    return out
