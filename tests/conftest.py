"""Shared test helpers. Tests run on CPU, on the two cores CI has, split between two pytest-xdist workers
a file at a time (`--dist loadfile`: module fixtures such as the Slurm cluster or the MLflow server are
built once, and two Slurm clusters never run jobs at the same time)."""

from __future__ import annotations

import os

import pytest
import torch

# Two workers with two OpenMP threads each would spin against each other on two cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, 2 // _WORKERS))


@pytest.fixture(autouse=True)
def _grad_mode_is_left_as_found():
    """Scripts run in the test process (tests/launch); one that switched autograd off globally would
    break every later test far from the cause. Fail the test that did it instead."""
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("the test left autograd disabled (torch.set_grad_enabled(False) without restoring it)")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, the tolerance measure of the equivalence tests."""
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_tensors_agree(tensors_a, tensors_b, tolerance: float) -> None:
    """Relative error below `tolerance` for every tensor, and for all of them together.

    Some gradients are zero by symmetry (a key bias: softmax ignores a constant added to every
    key; a bias followed by train-mode BatchNorm, which removes per-channel constants) and hold only
    rounding noise; those are measured against the norm of all the tensors together.
    """
    tensors_a, tensors_b = list(tensors_a), list(tensors_b)
    assert len(tensors_a) == len(tensors_b)
    overall = torch.cat([b.detach().flatten() for b in tensors_b])
    for i, (a, b) in enumerate(zip(tensors_a, tensors_b)):
        if b.norm() < 1e-6 * overall.norm():
            assert relative_error(a, b) * b.norm() < tolerance * overall.norm(), f"tensor {i}"
        else:
            assert relative_error(a, b) < tolerance, f"tensor {i}"
    assert relative_error(torch.cat([a.detach().flatten() for a in tensors_a]), overall) < tolerance
