"""The memory plan on a GPU, at docs/memory-plan.md's table's model (size s, 640 px, bf16) and 8 images: its
allocated bytes against `torch.cuda.max_memory_allocated` of real steps, its reserve against what the
allocator reserved (with expandable segments, as training runs), and its verdicts: under a budget
between the two predictions, full/explicit runs out of memory and full/sdpa fits."""

from __future__ import annotations

import gc
import itertools
import math

import pytest
import torch

from adyolo.config import RunConfig
from adyolo.data.batch import synthetic_batch
from adyolo.engine.setup import bare_step
from adyolo.plan.planner import Planner, Setting
from adyolo.plan.terms import GIB, ZeroSettings
from adyolo.plan.validate import check_gpu

from .jobs import MEMORY_BATCH, MEMORY_VARIANTS, memory_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TOLERANCE = 0.10  # what the plan promises for max_memory_allocated


def _planner(jobs, variant: str) -> Planner:
    jobs.result(f"trace:{variant}")
    model = memory_model(variant)
    cfg = RunConfig(model=model)
    return Planner(model, cfg.loss, cfg.optim, cfg.train, "bf16", jobs.plan_cache)


def _release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("variant", list(MEMORY_VARIANTS))
def test_the_plan_matches_max_memory_allocated(jobs, variant):
    _planner(jobs, variant)  # the trace is in the cache
    row = check_gpu(memory_model(variant), MEMORY_BATCH, "bf16", jobs.plan_cache)
    _release()
    assert abs(row["error"]) < TOLERANCE, row
    # The reserve the plan adds for the allocator (expandable segments) holds what it reserved.
    reserve = row["measured_reserved_bytes"] / row["measured_bytes"]
    assert reserve <= row["predicted_reserved_bytes"] / row["predicted_bytes"], (reserve, row)


def test_explicit_runs_out_of_memory_where_the_plan_says_and_sdpa_fits(jobs):
    predicted = {
        v: _planner(jobs, v).predict(Setting(MEMORY_BATCH, 1, "off"), 1, ZeroSettings(0)).reserved
        for v in ("full/sdpa", "full/explicit")
    }
    budget = math.sqrt(predicted["full/sdpa"] * predicted["full/explicit"])
    # Each prediction at least 15 % from the budget: more than the plan's tolerance either way.
    assert predicted["full/sdpa"] < budget / 1.15 and predicted["full/explicit"] > budget * 1.15, predicted
    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    _release()
    torch.cuda.set_per_process_memory_fraction(budget / total, device)
    try:
        torch.cuda.reset_peak_memory_stats()
        assert not _out_of_memory("full/sdpa", device), f"full/sdpa did not fit {budget / GIB:.2f} GiB"
        assert torch.cuda.max_memory_reserved() <= budget
        _release()
        assert _out_of_memory("full/explicit", device), f"full/explicit fitted {budget / GIB:.2f} GiB"
    finally:
        _release()
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def _out_of_memory(variant: str, device: torch.device) -> bool:
    """Whether two training steps of `variant` run out of memory (the failed step's tensors are
    released with the exception on return)."""
    try:
        _two_steps(variant, device)
    except torch.OutOfMemoryError:
        return True
    return False


def _two_steps(variant: str, device: torch.device) -> None:
    model = memory_model(variant)
    cfg = RunConfig(model=model)
    step = bare_step(model, cfg.loss, cfg.optim, cfg.train, device, torch.bfloat16)
    batches = itertools.repeat(synthetic_batch(MEMORY_BATCH, model.img_size, device))
    for i in range(2):
        step.run_window(batches, step=i)
    torch.cuda.synchronize(device)
