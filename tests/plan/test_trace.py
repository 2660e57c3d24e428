"""The memory plan against real training steps, where the measurement is exact: every live tensor's
bytes of a real CPU step (PyTorch's MemTracker on real tensors), not the process's RSS; on a GPU,
`torch.cuda.max_memory_allocated`.

One process: the line traced on fake tensors at 2 and 4 images predicts real steps at 3, 5 and 6 images;
three configurations cover both variants, sdpa and explicit attention, checkpointing off / selected /
all, fp32 and bf16, 64 and 96 px. Several processes: every rank of real DDP, ZeRO-2 and ZeRO-3 runs
through `accelerate launch`. The whole matrix (`launch/plan.py --validate`, every pairing of these and
160 px, 4 ranks, size s) is larger; these are the part CI runs. On a GPU: `tests/gpu/test_memory.py`.
"""

from __future__ import annotations

import pytest

from adyolo.config import RunConfig
from adyolo.model import ModelConfig
from adyolo.plan.trace import trace_step
from adyolo.plan.validate import ONE_PROCESS, check_one_process, check_ranks
from tests.engine.runs import environment

TOLERANCE = 0.10  # what the plan promises; the measured errors are far smaller (docs/memory-plan.md)


# The first in the fast tier, the others with the slow tests.
@pytest.mark.parametrize(
    "configuration",
    [ONE_PROCESS[0], *(pytest.param(c, marks=pytest.mark.slow) for c in ONE_PROCESS[1:3])],
    ids=lambda c: "-".join(map(str, c[:5])),
)
def test_the_traced_line_predicts_real_steps(configuration, tmp_path):
    rows = check_one_process(*configuration, cache_dir=tmp_path)
    assert rows and all(abs(r["error"]) < TOLERANCE for r in rows), rows


def test_a_fake_trace_counts_what_a_real_step_allocates():
    """The trace itself, not the line: the same step on fake and on real tensors."""
    cfg = RunConfig(model=ModelConfig(size="n", fusion="full", img_size=64))
    fake = trace_step(cfg.model, cfg.loss, cfg.optim, cfg.train, 2)
    real = trace_step(cfg.model, cfg.loss, cfg.optim, cfg.train, 2, fake=False)
    # No shape in the step depends on the data (the loss keeps every candidate), so fake is exact.
    assert fake.peak_bytes == real.peak_bytes and fake.at_peak == real.at_peak
    assert fake.parameters == real.parameters and fake.optimizer_state == real.optimizer_state > 0


@pytest.fixture(scope="module")
def rank_traces(tmp_path_factory):
    """One trace cache for the rank checks: they plan the same model, so it is traced once."""
    return tmp_path_factory.mktemp("plan-cache")


@pytest.mark.distributed
@pytest.mark.parametrize("zero", ["0", "2", "3"], ids=["ddp", "zero2", "zero3"])
def test_every_rank_of_a_two_process_run_is_predicted(zero, rank_traces, monkeypatch):
    for name, value in environment().items():
        monkeypatch.setenv(name, value)
    rows = check_ranks(zero, 2, "n", cache_dir=rank_traces)
    assert [r["rank"] for r in rows] == [0, 1]
    assert all(abs(r["error"]) < TOLERANCE for r in rows), rows
