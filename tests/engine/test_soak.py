"""The fault soak (tests/engine/soak.py) at its CI size: one fault of each kind on a 2-rank run, every
step's loss then equal to the uninterrupted run's. `python -m tests.engine.soak --faults 12` runs more."""

from __future__ import annotations

import pytest

from .soak import KINDS, soak

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_a_run_survives_one_fault_of_each_kind_and_trains_as_without_them(tmp_path):
    result = soak(faults=len(KINDS), seed=1, root=tmp_path)
    print(result.report())
    assert result.ok, result.report()
    struck = {fault.kind.split(" (")[0] for fault in result.faults}
    assert struck == set(KINDS) or (result.disk is None and struck == set(KINDS) - {"disk full"})
    assert result.redone > 0  # a killed rank or a damaged latest costs the steps since the checkpoint
