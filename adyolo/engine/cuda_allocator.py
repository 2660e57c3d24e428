"""The CUDA caching allocator's setting for training: expandable segments, unless the user chose.

With `expandable_segments:True` the caching allocator grows one mapping per stream instead of keeping
many fixed-size segments, so freed blocks merge and the memory it reserves stays close to what tensors
hold (fewer out-of-memory errors from fragmentation at a batch that fits). PyTorch reads the setting
when CUDA's allocator starts, so `configure_cuda_allocator` must run before anything touches CUDA: the
first thing a training process does. A `PYTORCH_CUDA_ALLOC_CONF` (or `PYTORCH_ALLOC_CONF`, the newer
name, which takes precedence) already in the environment is the user's choice and is kept as it is.
The memory plan's reserve term follows the setting in effect (`adyolo.plan.terms`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import MutableMapping
from dataclasses import dataclass

import torch

ENV = "PYTORCH_CUDA_ALLOC_CONF"
NEWER_ENV = "PYTORCH_ALLOC_CONF"  # read first by torch >= 2.9
DEFAULT = "expandable_segments:True"


@dataclass(frozen=True)
class AllocatorSetting:
    """The allocator configuration a process trains with, and whose choice it was."""

    conf: str  # e.g. "expandable_segments:True"; "" for PyTorch's own defaults
    source: str  # "adyolo" (set here) or the environment variable the user set
    cuda: bool = False  # whether this process trains on CUDA (elsewhere the setting means nothing)

    @property
    def expandable_segments(self) -> bool:
        return allocator_options(self.conf).get("expandable_segments", "false").lower() == "true"

    def summary(self) -> str:
        """One line for the start of a run."""
        if self.source == "adyolo":
            return f"CUDA allocator: {ENV}={self.conf} (set by adyolo; set {ENV} yourself to choose another)"
        return f"CUDA allocator: {self.source}={self.conf!r} (yours, kept)"

    def params(self) -> dict[str, str]:
        """For MLflow (nothing without CUDA)."""
        if not self.cuda:
            return {}
        return {"cuda_alloc_conf": self.conf or "default", "cuda_alloc_conf_source": self.source}


def allocator_options(conf: str) -> dict[str, str]:
    """`key:value,key:value` -> {key: value} (PyTorch's format for the allocator settings)."""
    options = {}
    for item in conf.split(","):
        key, _, value = item.partition(":")
        if key.strip():
            options[key.strip()] = value.strip()
    return options


def allocator_setting(environ: MutableMapping[str, str] | None = None) -> AllocatorSetting:
    """The setting a training process started with `environ` runs with (nothing is changed)."""
    environ = os.environ if environ is None else environ
    for name in (NEWER_ENV, ENV):
        if name in environ:
            return AllocatorSetting(environ[name], name)
    return AllocatorSetting(DEFAULT, "adyolo")


def configure_cuda_allocator(
    environ: MutableMapping[str, str] | None = None, announce: bool = False
) -> AllocatorSetting:
    """Set `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` in `environ` (default: this process's)
    unless the user set an allocator configuration; returns the setting in effect, and with `announce`
    (the main process) says it on a CUDA machine. Child processes (data loader workers, launched ranks)
    inherit it. If CUDA's allocator already started in this process, the setting is applied to it
    directly (expandable segments then apply to the segments it maps from now on)."""
    environ = os.environ if environ is None else environ
    setting = dataclasses.replace(allocator_setting(environ), cuda=torch.cuda.is_available())
    if setting.source == "adyolo":
        environ[ENV] = setting.conf
        if environ is os.environ and torch.cuda.is_initialized():
            _apply_now(setting.conf)
    if announce and setting.cuda:
        print(setting.summary(), flush=True)
    return setting


def _apply_now(conf: str) -> None:
    """The allocator settings changed in a running process (PyTorch's private entry point, whose
    name changed in torch 2.9; the public route is the environment variable before CUDA starts)."""
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:
        setter = torch.cuda.memory._set_allocator_settings
    setter(conf)
