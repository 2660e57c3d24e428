"""Where a run's wall time goes: seconds per phase, summed over the run.

The phases, in the order a run meets them:
    setup       from the process's start: imports, config, data check/generation, memory plan, model,
                Accelerate/DeepSpeed, the MLflow run
    data        waiting for the next batch from the loader (its workers run ahead while the step runs)
    forward     the model's forward pass
    loss        assignment and loss terms, and the all-rank check that the loss is finite
    backward    backward (under DeepSpeed also the gradient reduction, clipping and optimizer step)
    optimizer   clipping, optimizer step, zeroing the gradients, the EMA update
    validation  prediction on the validation set and scoring (all ranks)
    checkpoint  resumable checkpoints, best.pt and last.pt
    logging     MLflow metrics, progress bars, results table, validation pictures, per-rank memory
`other` is the rest of the wall time (e.g. the loop itself, between the timed regions).

On a GPU the timer synchronises the device at each boundary, so that the GPU's work is counted in the
phase that issued it; that costs a few percent of speed, and `log.phase_times: false` turns it off.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator

import torch

PHASES = ("setup", "data", "forward", "loss", "backward", "optimizer", "validation", "checkpoint", "logging")


class PhaseTimes:
    """`with times("forward"): ...` adds the block's wall time to the phase. Created when the run
    starts (`started`, `time.monotonic()`); `end_setup()` closes the setup phase."""

    def __init__(self, device: torch.device | None = None, enabled: bool = True, started: float | None = None):
        self.enabled = enabled
        self.cuda = enabled and device is not None and device.type == "cuda"
        self.started = time.monotonic() if started is None else started
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def end_setup(self) -> None:
        self.seconds["setup"] = time.monotonic() - self.started

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._sync()
        start = time.monotonic()
        try:
            yield
        finally:
            self._sync()
            self.seconds[phase] += time.monotonic() - start

    def batches(self, loader: Iterable) -> Iterator:
        """The loader's batches, the wait for each counted as `data`."""
        iterator = iter(loader)
        while True:
            with self("data"):
                batch = next(iterator, None)
            if batch is None:
                return
            yield batch

    def wall_s(self) -> float:
        return time.monotonic() - self.started

    def breakdown(self) -> dict[str, float]:
        """Seconds per phase, `other` (the untimed rest) and `wall`, since the run started."""
        wall = self.wall_s()
        out = dict(self.seconds)
        out["other"] = max(wall - sum(self.seconds.values()), 0.0)
        out["wall"] = wall
        return out

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def format_breakdown(seconds: dict[str, float]) -> str:
    """One line: `time by phase (14 min 18 s since the process started): setup 41 s (5%), data 3 s (0%), ...`."""
    wall = max(seconds["wall"], 1e-9)
    parts = [f"{k} {_short(v)} ({100 * v / wall:.0f}%)" for k, v in seconds.items() if k != "wall"]
    return f"time by phase ({_short(seconds['wall'])} since the process started): " + ", ".join(parts)


def _short(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{seconds:.1f} s" if seconds < 10 else f"{secs} s"
