"""GPU tests: everything here is gpu-marked and skipped without CUDA (bar `test_jobs.py`, the CPU check
of what they start). On a GPU machine the training runs and the plan's traces start together when the
first test asks for them, and the tests read their results as they come."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adyolo.config import load_run_config
from adyolo.engine.cuda_allocator import configure_cuda_allocator
from adyolo.plan.planner import Planner
from adyolo.plan.terms import GIB
from tests.engine.runs import TINY

from .jobs import PROBE, PROBE_GLOBAL_BATCH, Jobs

if torch.cuda.is_available():
    # What training does first: the memory the tests measure is the allocator's that training uses.
    configure_cuda_allocator()


@pytest.fixture(scope="session")
def jobs(tmp_path_factory):
    """The session's background work: traces, the three modes' runs and resumptions, the probe's run
    (its memory fraction set from the plan; see `probe_budget`). One trace cache for the session's
    in-process plans and the runs' own."""
    jobs = Jobs(tmp_path_factory.mktemp("gpu-runs"), tmp_path_factory.mktemp("xdg-cache"))
    jobs.start_traces()
    jobs.start_training()
    jobs.result("trace:probe")
    jobs.start_probe(*probe_budget(jobs.plan_cache))
    yield jobs
    jobs.close()


def probe_budget(cache: Path) -> tuple[float, float]:
    """(the plan's budget: the whole GPU, so the plan picks all 8 images per step; the probe's memory
    fraction: the step tensors of 6 images, more than 4 need and less than 8 do, so the probe steps
    down from 8 whatever the memory beside the tensors)."""
    cfg = load_run_config(TINY, PROBE)
    planner = Planner(cfg.model, cfg.loss, cfg.optim, cfg.train, "bf16", cache)
    tensors = planner.step_memory((), "gpu").peak
    assert tensors(PROBE_GLOBAL_BATCH) > 1.3 * tensors(PROBE_GLOBAL_BATCH // 2), "too small to tell 4 from 8"
    total = torch.cuda.get_device_properties(0).total_memory
    return total / GIB, tensors(6) / total
