"""Activation checkpointing of whole blocks, without double-counting BatchNorm statistics.

A checkpointed block keeps only its inputs in forward and runs again in backward. Running a
BatchNorm again in training mode would update its running statistics and `num_batches_tracked` a
second time (pytorch/pytorch#96136). The recompute therefore runs inside a context that snapshots
the block's BatchNorm buffers and writes them back afterwards: statistics, outputs and gradients
are then identical to the same block run without checkpointing.

Blocks are marked by name (`enable_activation_checkpointing`) and the detector calls them through
`run_block`, so the state dict is the same with checkpointing on or off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from functools import partial

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

_FLAG = "activation_checkpointing"


def run_block(block: nn.Module, *inputs: torch.Tensor):
    """Call `block(*inputs)`, recomputing it in backward if it was marked for checkpointing."""
    if getattr(block, _FLAG, False) and block.training and torch.is_grad_enabled():
        return checkpoint(
            block,
            *inputs,
            use_reentrant=False,
            context_fn=partial(_contexts, block),
        )
    return block(*inputs)


def enable_activation_checkpointing(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Mark the submodules called `names` (dotted, as in the state dict); returns the marked names."""
    marked = []
    for name in names:
        setattr(model.get_submodule(name), _FLAG, True)
        marked.append(name)
    return marked


def disable_activation_checkpointing(model: nn.Module) -> None:
    """Unmark every block: forward and backward then run each block once."""
    for block in model.modules():
        block.__dict__.pop(_FLAG, None)


def checkpointed_blocks(model: nn.Module) -> list[str]:
    """Names of the submodules currently marked for checkpointing."""
    return [name for name, m in model.named_modules() if getattr(m, _FLAG, False)]


def _contexts(block: nn.Module):
    # (context for the first forward, context for the recompute in backward)
    return contextlib.nullcontext(), _restore_batchnorm_buffers(block)


@contextlib.contextmanager
def _restore_batchnorm_buffers(block: nn.Module) -> Iterator[None]:
    saved = [
        (buffer, buffer.clone())
        for m in block.modules()
        if isinstance(m, _BatchNorm)
        for buffer in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buffer is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
