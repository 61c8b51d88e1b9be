"""Who is working on a part of a study: one lock file per part, taken by whoever works on it.

A lock names its holder: the machine, the process id, the process's start time (so that a recycled process id is not
taken for the holder) and, for a SLURM job, the job's id. A lock is taken over only when its holder is known to be
gone:

- a SLURM job's lock, when the scheduler no longer lists the job as queued or running;
- a lock of this machine, when its process has exited;
- a lock of another machine without a job id, never: nothing here can tell whether that worker is alive. The study
  names it and says how to release it (delete the file once that worker is gone). Several machines work on one study
  through a scheduler (`--launcher slurm`), not by sharing a directory.

A worker that stops cleanly (its run done, failed, or interrupted by Ctrl-C) removes its lock.
"""

import json
import os
import socket
import time
import uuid
from pathlib import Path

from . import slurm

SLURM_JOB_VARIABLE = "SLURM_JOB_ID"


def _process_start(pid: int) -> str | None:
    """When process `pid` started, in clock ticks since boot (`/proc/<pid>/stat`, field 22), or None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # the fields after the command name, which may hold spaces


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def this_process() -> dict:
    """The holder record of this process."""
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
              "boot_id": _boot_id(), "since": round(time.time(), 1), "token": uuid.uuid4().hex}
    if os.environ.get(SLURM_JOB_VARIABLE):
        holder["slurm_job_id"] = os.environ[SLURM_JOB_VARIABLE]
    return holder


def process_alive(holder: dict) -> bool:
    """Whether the process a holder record of this machine names is still the one that wrote it."""
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, KeyError, TypeError):
        return True  # exists, owned by another user; or an unreadable record: assume alive
    if holder.get("boot_id") not in (None, _boot_id()):
        return False  # written before a reboot
    started = holder.get("process_start")
    return started is None or started == _process_start(int(holder["pid"]))


def holder_gone(holder: dict) -> bool | None:
    """Whether the lock's holder is known to be gone: `True`, `False` (alive), or `None` (cannot be told here)."""
    if holder.get("slurm_job_id"):
        live = slurm.is_live(str(holder["slurm_job_id"]))
        if live is not None:
            return not live
    if holder.get("host") == socket.gethostname():
        return not process_alive(holder)
    return None


def describe(holder: dict | None) -> str:
    """The holder in words, for messages."""
    if holder is None:
        return "a worker whose lock file is unreadable"
    job = f"SLURM job {holder['slurm_job_id']}, " if holder.get("slurm_job_id") else ""
    since = time.strftime("%Y-%m-%d %H:%M", time.localtime(holder["since"])) if holder.get("since") else "?"
    return f"{job}process {holder.get('pid')} on {holder.get('host')} (since {since})"


def read_lock(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


class Lock:
    """A lock this process holds; `release()` removes it if it is still ours."""

    def __init__(self, path: Path, holder: dict):
        self.path, self.holder = path, holder

    def release(self) -> None:
        if read_lock(self.path) == self.holder:
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


class Held(Exception):
    """The lock is held by a live worker, or by one this machine cannot check."""

    def __init__(self, path: Path, holder: dict | None, checkable: bool):
        self.path, self.holder, self.checkable = path, holder, checkable
        super().__init__(self.sentence())

    def sentence(self) -> str:
        if self.checkable:
            return f"{self.path} is held by {describe(self.holder)}, which is still running"
        return (f"{self.path} is held by {describe(self.holder)}, which this machine cannot check: if that worker is "
                f"gone, delete {self.path}")


def acquire(path: Path, announce=print) -> Lock:
    """Take the lock file at `path`, taking over one whose holder is gone (saying so through `announce`); raise
    `Held` if a live holder has it or its holder cannot be checked.

    Atomic between workers: the file is created exclusively, and a dead holder's file is moved aside by rename, so of
    two workers that both find it dead, one moves it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = this_process()
    for _ in range(3):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            found = read_lock(path)
            if found is None:  # a writer mid-write, or cut short: only a lock older than a minute is taken over
                try:
                    if time.time() - path.stat().st_mtime < 60:
                        raise Held(path, None, checkable=True) from None
                except FileNotFoundError:
                    continue
                gone = True
            else:
                gone = holder_gone(found)
            if not gone:
                raise Held(path, found, checkable=gone is False) from None
            aside = path.with_name(f"{path.name}.stale.{holder['token']}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue  # another worker moved it first
            if read_lock(aside) != found:  # a fresh lock was taken between the read and the move: put it back
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
                aside.unlink(missing_ok=True)
                raise Held(path, read_lock(path), checkable=True) from None
            aside.unlink(missing_ok=True)
            announce(f"{path.parent.name}: took over the lock of {describe(found)}, which has ended")
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(json.dumps(holder))
        return Lock(path, holder)
    raise Held(path, read_lock(path), checkable=True)


def blocking(path: Path) -> Held | None:
    """Who keeps the lock at `path` from being taken now (without taking it): a `Held`, or None if it is free or its
    holder is gone."""
    found = read_lock(path)
    if found is None:  # free, or a writer mid-write (taken over by `acquire` once a minute old)
        try:
            young = time.time() - path.stat().st_mtime < 60
        except FileNotFoundError:
            return None
        return Held(path, None, checkable=True) if young else None
    gone = holder_gone(found)
    return None if gone else Held(path, found, checkable=gone is False)
