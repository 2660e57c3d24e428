"""A tiny detector trained once per test session: what evaluate, detect and export are tested on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from filelock import FileLock

from tests.engine.runs import LEARNABLE, run, train_command


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """Run directory of a finished 12-epoch tiny run (size n, efficient, 96 px; about 20 s): best.pt,
    last.pt, and the synthetic data it used under `<run>/../synthetic/data` (train/ and val/ folders).

    12 epochs at lr 0.005 separate it from an untrained detector (val ap_easy about
    0.3 vs 0.004 at conf 0.001; 4 epochs do not). It is evaluated once, at the end, so that best.pt is
    the trained EMA: with scores still below the validation threshold (0.02) every evaluation ties at
    ap_hard 0 and best.pt would stay the first epoch's weights."""
    # One run for the whole session: pytest-xdist's workers share their session's folder, the first to
    # come trains, the others wait for it.
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "trained"
    out, synthetic = root / "run", root / "synthetic" / "data"
    with FileLock(f"{root}.lock"):
        if not (out / "best.pt").is_file():
            command = train_command(out, synthetic, *LEARNABLE, "epochs=12", "optim.lr=0.005", "train.eval_interval=12")
            proc = run(command + ["--exist-ok"], timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert (out / "best.pt").is_file()
    return out
