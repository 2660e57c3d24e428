"""Supervising `accelerate launch` for `launch/launch.py`: its output passed through, the ranks' exit
code (`adyolo.failures`) as its own, signals handed on, and nothing left running if this process dies.

torchrun reports any failed rank as exit code 1, after its own log lines and traceback. The ranks
write the code they agreed on to `$ADYOLO_EXIT_FILE` (`record_exit`); `supervise` reads it back
once the launcher has ended and leaves the launcher's account of an expected ending out.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from adyolo.failures import (
    EXIT_BAD_INPUT,
    EXIT_FILE_ENV,
    EXIT_INTERRUPTED,
    EXIT_NONFINITE,
    EXIT_STOPPED_BY_SIGNAL,
    EXIT_WRITE_FAILED,
    signal_on_parent_death,
)

EXPECTED = {EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_WRITE_FAILED, EXIT_STOPPED_BY_SIGNAL, EXIT_INTERRUPTED}
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def read_code(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def with_process_count(argv: list[str], gpus: int) -> list[str]:
    """`accelerate launch` arguments with `--num_processes` filled in where the command leaves it out and
    this machine has GPUs: one process per GPU (the project's accelerate configs set none, so that plain
    `accelerate launch` asks for it rather than start a default)."""
    given = any(a == "--num_processes" or a.startswith("--num_processes=") for a in argv)
    if given or gpus < 1:
        return argv
    return ["--num_processes", str(gpus), *argv]


def supervise(argv: list[str]) -> int:
    """Run `accelerate launch <argv>` to its end; returns the exit code for the shell."""
    import torch  # here, not at import: the wrapper's start stays light for --help

    argv = with_process_count(argv, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    accelerate = Path(sys.executable).with_name("accelerate")
    with tempfile.TemporaryDirectory(prefix="adyolo-launch-") as tmp:
        exit_file = Path(tmp) / "exit_code"
        env = {**os.environ, EXIT_FILE_ENV: str(exit_file)}
        child = subprocess.Popen(
            [str(accelerate if accelerate.exists() else "accelerate"), "launch", *argv],
            env=env,
            stderr=subprocess.PIPE,
            preexec_fn=signal_on_parent_death,  # if this process is killed, the launcher gets SIGTERM
        )

        def forward(signum, frame):
            child.send_signal(signal.SIGTERM)  # torchrun passes SIGTERM on to every rank

        for sig in FORWARDED:
            signal.signal(sig, forward)
        # Raw chunks, not lines: progress bars redraw with '\r'. Once the ranks have recorded an
        # expected ending, the launcher's report of it (its log lines and traceback) says nothing new.
        pending, dropping, ended = b"", False, False
        while chunk := os.read(child.stderr.fileno(), 65536):  # retried after a forwarded signal (PEP 475)
            ended = ended or read_code(exit_file) in EXPECTED  # once written, the code stays
            if not ended:
                _write(chunk)
                continue
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                dropping = dropping or launcher_report(line)
                if not dropping:
                    _write(line + b"\n")
        if pending and not dropping and not launcher_report(pending):
            _write(pending)
        returncode = child.wait()
        code = read_code(exit_file)
    if returncode != 0 and code in EXPECTED:
        return code
    return returncode if returncode >= 0 else 128 - returncode  # killed by a signal: as a shell says it


def launcher_report(line: bytes) -> bool:
    """A line of torchrun's account of failed ranks: its elastic-agent log lines, its traceback."""
    return line.startswith(b"Traceback (most recent call last)") or any(
        mark in line for mark in (b"torch.distributed.elastic", b"torch/distributed/elastic")
    )


def _write(data: bytes) -> None:
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()
