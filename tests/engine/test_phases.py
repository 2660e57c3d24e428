"""The run's time breakdown: phases add their blocks' wall time, the loader's wait counts as data, the rest
is `other`, and the line printed at the end names every phase."""

from __future__ import annotations

import time

import pytest
import torch

from adyolo.engine.phases import PHASES, PhaseTimes, format_breakdown


def test_phases_add_up_within_the_wall_time():
    times = PhaseTimes(torch.device("cpu"))
    time.sleep(0.02)
    times.end_setup()
    for _ in range(2):
        with times("forward"):
            time.sleep(0.01)

    def slow_loader():
        for i in range(3):
            time.sleep(0.01)
            yield i

    assert list(times.batches(slow_loader())) == [0, 1, 2]
    time.sleep(0.01)  # untimed: `other`
    seconds = times.breakdown()
    assert seconds["setup"] >= 0.02 and seconds["forward"] >= 0.02 and seconds["data"] >= 0.03
    assert seconds["backward"] == 0.0 and seconds["other"] >= 0.01
    assert sum(seconds[p] for p in PHASES) + seconds["other"] == pytest.approx(seconds["wall"])
    line = format_breakdown(seconds)
    assert line.startswith("time by phase (") and all(f" {p} " in line for p in (*PHASES, "other"))


def test_a_phase_counts_even_when_its_block_raises():
    times = PhaseTimes()
    with pytest.raises(ZeroDivisionError), times("checkpoint"):
        time.sleep(0.01)
        1 / 0  # noqa: B018
    assert times.seconds["checkpoint"] >= 0.01


def test_disabled_times_nothing():
    times = PhaseTimes(enabled=False)
    with times("forward"):
        time.sleep(0.01)
    assert times.seconds["forward"] == 0.0
