"""Known library noise, silenced where it starts, so the terminal shows the run.

Each entry is a message these libraries print on every run that asks nothing of the user. Everything
else (a real warning, an error) still shows. Ranks other than the main one keep only errors: the main
rank already prints whatever they would, once.
"""

from __future__ import annotations

import logging
import warnings

# (logger, start of the message): log records dropped at their logger.
KNOWN_LOG_RECORDS = (
    # DeepSpeed on every CPU-only start: it could not find a GPU (the run chose the CPU and told it so:
    # `engine.accelerator.launch_settings` sets DS_ACCELERATOR).
    ("DeepSpeed", "Setting accelerator to CPU"),
    # Our optimizers are torch's own SGD / AdamW, which ZeRO partitions correctly.
    ("DeepSpeed", "**** You are using ZeRO with an untested optimizer"),
    # DeepSpeed's CPU communication op finds no CUDA toolkit, which it does not need.
    ("torch.utils.cpp_extension", "No CUDA runtime is found"),
)
# (category, message regex): Python warnings ignored.
KNOWN_WARNINGS = (
    # DeepSpeed's ZeRO calls torch's deprecated name; nothing for a user to change.
    (FutureWarning, r"`torch.distributed.all_gather_into_tensor` is deprecated"),
)


class _DropKnown(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_known_noise(main_process: bool) -> None:
    """Install the filters (idempotent); call before DeepSpeed is imported, i.e. before the Accelerator."""
    by_logger: dict[str, list[str]] = {}
    for name, prefix in KNOWN_LOG_RECORDS:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        logger = logging.getLogger(name)
        logger.filters = [f for f in logger.filters if not isinstance(f, _DropKnown)]
        logger.addFilter(_DropKnown(tuple(prefixes)))
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if not main_process:
        warnings.filterwarnings("ignore")
        for name in ("DeepSpeed", "torch", "accelerate"):
            logging.getLogger(name).setLevel(logging.ERROR)
