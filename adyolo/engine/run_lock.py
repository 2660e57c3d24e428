"""One writer per run folder: `<output_dir>/run.lock`, held by the main process of the run writing it.

The lock file names its holder (host, pid, when it started, the Slurm job) and is held with an OS lock
(`flock`) where the filesystem has one; a thread touches it every `HEARTBEAT_S` while the run lives.
A second run into the folder stops with exit code 2 naming the holder. A lock its holder left behind
(killed, or its node lost) is taken over with a warning:

- same host: the holder's process is gone (the OS lock is free, or the pid runs no longer or is
  another process now);
- another host: the lock has not been touched for `STALE_AFTER_S`, or the holder was an earlier run
  of this Slurm job (a requeue), or `--force-unlock` says so.

Every rank checks the folder before the process group forms (`check_not_in_use`, reading only); the
main process then takes the lock and every rank learns the outcome before any of them writes
(`hold_run_folder`). The lock is released (the file removed) when the process exits.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import psutil
from accelerate.utils import broadcast_object_list

from adyolo.failures import InputError

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0  # how often the holder touches the lock file
STALE_AFTER_S = 300.0  # a lock from another host untouched this long is left by a dead run


@dataclass(frozen=True)
class Holder:
    """Who holds a run folder: what the lock file says."""

    host: str
    pid: int
    started: str  # when the holder took the lock, local time of its host (for people)
    process_start: float  # the holder process's creation time (tells a reused pid from the holder)
    slurm_job: str | None = None

    @classmethod
    def this_process(cls) -> Holder:
        return cls(
            socket.gethostname(),
            os.getpid(),
            datetime.now().isoformat(timespec="seconds"),
            psutil.Process().create_time(),
            os.environ.get("SLURM_JOB_ID"),
        )

    def describe(self) -> str:
        job = f", Slurm job {self.slurm_job}" if self.slurm_job else ""
        return f"pid {self.pid} on {self.host} (since {self.started}{job})"


def read_holder(path: Path) -> tuple[Holder, float] | None:
    """(the holder a lock file names, when it was last touched), or None: no file, or no holder in it."""
    try:
        text, touched = path.read_text(), path.stat().st_mtime
        return Holder(**json.loads(text)), touched
    except (OSError, ValueError, TypeError):
        return None


def stale_reason(holder: Holder, touched: float, os_lock_free: bool | None) -> str | None:
    """Why the lock `holder` left is no longer held ("its process ended", ...), or None while it may be.
    `os_lock_free`: whether this process could take the OS lock (None where the filesystem has none)."""
    if holder.host == socket.gethostname():
        if os_lock_free:
            return "its process ended"
        try:
            if abs(psutil.Process(holder.pid).create_time() - holder.process_start) > 1.0:
                return f"pid {holder.pid} is another process now"
        except psutil.NoSuchProcess:
            return "its process ended"
        return None
    if holder.slurm_job and holder.slurm_job == os.environ.get("SLURM_JOB_ID"):
        return "an earlier run of this Slurm job (requeued)"
    if os_lock_free is False:  # a filesystem that shares its locks between hosts (NFS): the holder lives
        return None
    idle = time.time() - touched
    if idle > STALE_AFTER_S:
        return f"not touched for {idle / 60:.0f} min"
    return None


def _in_use(folder: Path, holder: Holder) -> InputError:
    return InputError(
        f"output_dir={folder} is in use by another run: {holder.describe()}; wait for it to end or choose another "
        f"output_dir=. If that run is not running any more, --force-unlock takes the folder over "
        f"(lock file: {folder / LOCK_FILE})"
    )


def check_not_in_use(output_dir: str | Path, force_unlock: bool = False) -> None:
    """Raise `InputError` naming the holder when another live run holds the folder. Writes nothing, so
    every rank can ask before the process group exists (none of this job's ranks holds the lock yet)."""
    found = read_holder(Path(output_dir) / LOCK_FILE)
    if found is not None and not force_unlock and stale_reason(*found, os_lock_free=None) is None:
        raise _in_use(Path(output_dir), found[0])


class RunLock:
    """The lock of one run folder, held by this process until `release` (or its exit)."""

    def __init__(self, output_dir: str | Path):
        self.folder = Path(output_dir)
        self.path = self.folder / LOCK_FILE
        self.holder = Holder.this_process()
        self._fd: int | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self, force_unlock: bool = False) -> RunLock:
        """Take the folder, or raise `InputError` naming the live holder. Warns (stderr) when it takes over
        a lock a dead run left, or one `force_unlock` overrides."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, os_lock_free = self._open_locked()
        try:
            found = read_holder(self.path)
            if found is not None:
                holder, touched = found
                why = stale_reason(holder, touched, os_lock_free)
                if why is None and not force_unlock:
                    raise _in_use(self.folder, holder)
                what = why or "--force-unlock" + (" (the OS still reports it held)" if os_lock_free is False else "")
                print(
                    f"warning: {self.folder} was locked by {holder.describe()}: taken over ({what})",
                    file=sys.stderr,
                    flush=True,
                )
            elif os_lock_free is False and not force_unlock:  # held, and its holder not written yet
                raise InputError(
                    f"output_dir={self.folder} is being taken by another run that is starting; choose another "
                    "output_dir= (or --force-unlock if none is)"
                )
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(asdict(self.holder)).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._heartbeat = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._heartbeat.start()
        atexit.register(self.release)
        return self

    def _open_locked(self) -> tuple[int, bool | None]:
        """(the lock file's descriptor, whether the OS lock is ours: True; held by another process: False;
        the filesystem has none: None). The file may be removed by a holder releasing it between our open
        and our lock: then the lock is on a file nobody else will open, so open it again."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return fd, False
            except OSError as err:
                if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    return fd, None
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd, True
            os.close(fd)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self._fd)
            except OSError:
                pass  # a lost mount: the run's own writes will say so

    def release(self) -> None:
        """Remove the lock file (if it still names this process) and drop the OS lock. Idempotent."""
        if self._fd is None:
            return
        self._stop.set()
        self._heartbeat.join()
        found = read_holder(self.path)
        if found is not None and found[0] == self.holder:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        atexit.unregister(self.release)


def hold_run_folder(accelerator, output_dir: str | Path, force_unlock: bool = False) -> RunLock | None:
    """The main process takes the folder's lock; every rank raises the same `InputError` if it could not.
    A collective: call it on every rank once the process group exists, before anything is written."""
    lock, refusal = None, [None]
    if accelerator.is_main_process:
        try:
            lock = RunLock(output_dir).acquire(force_unlock)
        except InputError as err:
            refusal = [str(err)]
    if accelerator.num_processes > 1:
        broadcast_object_list(refusal)
    if refusal[0] is not None:
        raise InputError(refusal[0])
    return lock


__all__ = ["LOCK_FILE", "RunLock", "check_not_in_use", "hold_run_folder"]
