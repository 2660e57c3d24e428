"""How a run ends when it cannot go on: the exit codes it documents, and the errors that carry them.

Every rank of a job ends with the same code (the ranks agree, or meet the same input error before
any process group exists), so DeepSpeed's launcher passes it on as it is. `accelerate launch`
(torchrun) turns any non-zero code into 1 after its own traceback; `launch/launch.py` runs it and
exits with the code the ranks wrote to `$ADYOLO_EXIT_FILE`, which `slurm/train.sh` uses too.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

EXIT_BAD_INPUT = 2  # a config, data, resume or output-folder error; nothing trained, nothing written
EXIT_NONFINITE = 3  # too many non-finite losses in a row; `latest` holds the last finite state
EXIT_WRITE_FAILED = 74  # EX_IOERR: a checkpoint could not be written (disk full); `latest` is intact
EXIT_STOPPED_BY_SIGNAL = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1/SIGINT, checkpoint saved: rerun with --resume
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell says it: Ctrl-C twice, stopped at once without saving

EXIT_FILE_ENV = "ADYOLO_EXIT_FILE"  # where each node's local main rank writes the job's exit code


class RunFailure(Exception):
    """An expected way for a run to end: `exit_code` and one line for its user, no traceback."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class InputError(RunFailure):
    """Input the user can fix (data, `--resume`, output folder), found before any training step."""

    exit_code = EXIT_BAD_INPUT


class WriteFailed(RunFailure):
    """A checkpoint or weights file could not be written; the previous `latest` is left as it was."""

    exit_code = EXIT_WRITE_FAILED


def record_exit(code: int) -> None:
    """Leave the job's exit code where the launcher wrapper reads it (one writer per node)."""
    path = os.environ.get(EXIT_FILE_ENV)
    if path and os.environ.get("LOCAL_RANK", "0") == "0":
        try:
            Path(path).write_text(f"{code}\n")
        except OSError:
            pass  # the wrapper then reports the launcher's own code


def signal_on_parent_death(signum: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send this process `signum` when its parent dies (Linux `PR_SET_PDEATHSIG`);
    returns whether it could. Safe between fork and exec (no allocation beyond ctypes' call)."""
    try:
        import ctypes

        pr_set_pdeathsig = 1
        return ctypes.CDLL(None).prctl(pr_set_pdeathsig, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def stop_with_parent() -> None:
    """Under a launcher (torchrun, DeepSpeed's), SIGTERM this rank when the launcher dies (kill -9, or
    a signal it does not handle): the rank then saves and stops instead of training on unsupervised."""
    if "LOCAL_RANK" not in os.environ:
        return  # started by hand: a closed terminal must not stop a `nohup` run
    if signal_on_parent_death() and os.getppid() == 1:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
