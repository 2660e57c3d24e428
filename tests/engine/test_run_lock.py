"""One writer per run folder (`adyolo.engine.run_lock`), in one process against real other processes:
a live holder keeps the folder, a dead one's lock is taken over with a warning, another host's lock
counts until its heartbeat stops, and `--force-unlock` overrides."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types

import psutil
import pytest

from adyolo.engine import run_lock
from adyolo.engine.preflight import check_output_dir
from adyolo.engine.run_lock import LOCK_FILE, STALE_AFTER_S, RunLock, check_not_in_use, hold_run_folder
from adyolo.failures import InputError

ONE_PROCESS = types.SimpleNamespace(is_main_process=True, num_processes=1)


def holding(folder, *, os_lock_only: bool = False) -> subprocess.Popen:
    """Another process that takes `folder`'s lock (with `RunLock`, or only the OS lock on an empty file,
    as a run that is starting holds it) and keeps it until it is killed."""
    if os_lock_only:
        code = f"""
            import fcntl, os, sys
            fd = os.open({str(folder / LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)
            fcntl.flock(fd, fcntl.LOCK_EX)
        """
    else:
        code = f"""
            from adyolo.engine.run_lock import RunLock
            RunLock({str(folder)!r}).acquire()
        """
    code = textwrap.dedent(code) + "print('held', flush=True)\nimport time\ntime.sleep(600)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def write_holder(folder, host: str, pid: int = 4242, age_s: float = 0.0, slurm_job: str | None = None) -> None:
    """A lock file as a run on `host` left it, last touched `age_s` ago."""
    folder.mkdir(parents=True, exist_ok=True)
    holder = {"host": host, "pid": pid, "started": "2026-12-01T10:00:00", "process_start": 1.0, "slurm_job": slurm_job}
    (folder / LOCK_FILE).write_text(json.dumps(holder))
    touched = time.time() - age_s
    os.utime(folder / LOCK_FILE, (touched, touched))


def test_a_live_holder_keeps_the_folder_and_a_dead_ones_lock_is_taken_over(tmp_path, capsys):
    folder = tmp_path / "run"
    other = holding(folder)
    try:
        for refused in (lambda: check_output_dir(folder, "latest", False), lambda: RunLock(folder).acquire()):
            with pytest.raises(InputError, match=rf"in use by another run: pid {other.pid} on {socket.gethostname()}"):
                refused()
        assert "--force-unlock" in str(pytest.raises(InputError, check_not_in_use, folder).value)
    finally:
        other.send_signal(signal.SIGKILL)  # what a lost node or an OOM killer leaves: the lock file stays
        other.wait()
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == other.pid
    check_not_in_use(folder)  # its process is gone
    lock = hold_run_folder(ONE_PROCESS, folder)
    warning = capsys.readouterr().err
    assert f"was locked by pid {other.pid}" in warning and "taken over (its process ended)" in warning
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(InputError, match=f"pid {os.getpid()}"):  # one writer, also within one process
        hold_run_folder(ONE_PROCESS, folder)
    lock.release()
    assert not (folder / LOCK_FILE).exists()
    lock.release()  # idempotent (it also runs at exit)


def test_a_run_that_is_taking_the_folder_keeps_it(tmp_path):
    """The OS lock is held, the holder not written yet: a starting run, not a dead one."""
    folder = tmp_path / "run"
    folder.mkdir()
    other = holding(folder, os_lock_only=True)
    try:
        check_not_in_use(folder)  # nothing to read yet: every rank passes, the main rank's lock decides
        with pytest.raises(InputError, match="being taken by another run that is starting"):
            RunLock(folder).acquire()
        RunLock(folder).acquire(force_unlock=True).release()
    finally:
        other.kill()
        other.wait()


def test_another_hosts_lock_counts_until_its_heartbeat_stops(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "run"
    write_holder(folder, "node-17", age_s=60)
    for refused in (lambda: check_not_in_use(folder), lambda: RunLock(folder).acquire()):
        with pytest.raises(InputError, match=r"pid 4242 on node-17 \(since 2026-12-01T10:00:00\)"):
            refused()
    RunLock(folder).acquire(force_unlock=True).release()
    assert "node-17" in capsys.readouterr().err and not (folder / LOCK_FILE).exists()

    write_holder(folder, "node-17", age_s=STALE_AFTER_S + 60)  # its heartbeat stopped: the node was lost
    check_not_in_use(folder)
    RunLock(folder).acquire().release()
    assert "taken over (not touched for 6 min)" in capsys.readouterr().err

    # A requeued Slurm job finds the lock of its own earlier run, whose node may still look alive.
    write_holder(folder, "node-17", slurm_job="4711")
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    RunLock(folder).acquire().release()
    assert "an earlier run of this Slurm job (requeued)" in capsys.readouterr().err


def test_the_holder_touches_its_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path).acquire()
    try:
        os.utime(tmp_path / LOCK_FILE, (1.0, 1.0))
        time.sleep(0.5)
        assert time.time() - (tmp_path / LOCK_FILE).stat().st_mtime < 5
    finally:
        lock.release()


def test_without_os_locks_the_holders_process_decides(tmp_path, capsys, monkeypatch):
    """A filesystem without flock (some parallel filesystems): the pid and its start time decide."""

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    folder = tmp_path / "run"
    parent = psutil.Process(os.getppid())
    write_holder(folder, socket.gethostname(), pid=parent.pid)  # a live pid, but started at another time
    (folder / LOCK_FILE).write_text(
        json.dumps({**json.loads((folder / LOCK_FILE).read_text()), "process_start": parent.create_time()})
    )
    with pytest.raises(InputError, match=f"pid {parent.pid}"):
        RunLock(folder).acquire()
    write_holder(folder, socket.gethostname(), pid=parent.pid)  # same pid, another start time: reused
    RunLock(folder).acquire().release()
    assert f"pid {parent.pid} is another process now" in capsys.readouterr().err
