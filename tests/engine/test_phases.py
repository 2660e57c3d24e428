"""The run's time breakdown: phases add their blocks' wall time, the loader's wait counts as data, the rest
is `other`, and the line printed at the end names every phase."""

from __future__ import annotations

import time

import pytest
import torch

from adyolo.engine.accelerator import resolve_channels_last, resolve_precision
from adyolo.engine.config import TrainConfig
from adyolo.engine.phases import PHASES, PhaseTimes, format_breakdown
from adyolo.run import precision_text
from adyolo.schema import ConfigError


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


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_and_memory_format_on_cpu(monkeypatch, native):
    """auto is bf16 (channels_last) on a CPU with native bf16, fp32 (contiguous) on one without; an explicit
    precision is kept either way; bf16 asked for runs channels_last."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("adyolo.engine.accelerator.cpu_has_bf16", lambda: native)
    monkeypatch.setattr("adyolo.run.cpu_has_bf16", lambda: native)
    train = TrainConfig()
    precision = resolve_precision(train, None, None)
    assert precision == ("bf16" if native else "fp32")
    assert resolve_channels_last(train, precision).channels_last is native
    assert precision_text(resolve_channels_last(train, precision), precision) == (
        "bf16 autocast (auto: this CPU has native bf16; train.precision=fp32 for fp32), channels_last"
        if native
        else "fp32 (auto: this CPU has no native bf16)"
    )
    assert precision_text(train, "bf16", deepspeed=True) == "bf16 autocast"  # the JSON's choice, not the CPU's
    assert resolve_precision(TrainConfig(precision="bf16"), None, None) == "bf16"
    assert resolve_precision(TrainConfig(precision="fp32"), None, None) == "fp32"
    assert resolve_channels_last(train, "bf16").channels_last is True
    assert resolve_channels_last(TrainConfig(channels_last=False), "bf16").channels_last is False
    # DeepSpeed flattens the parameters: auto is off under it, and true is refused before any work.
    assert resolve_channels_last(train, "bf16", deepspeed=True).channels_last is False
    with pytest.raises(ConfigError, match="train.channels_last: true cannot run under DeepSpeed"):
        resolve_channels_last(TrainConfig(channels_last=True), "bf16", deepspeed=True)
