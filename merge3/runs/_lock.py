"""One writer per run: an exclusive lock on ``<run>/.lock`` held for the life of a search or resume.

The lock is an ``flock`` on the file (the kernel drops it when its process dies, however it dies), and the file names
its holder (pid, host, start time) so a second writer can be told who holds the run. A lock left by a process that
is gone (killed, crashed) is simply taken over; the log says so.

>>> import tempfile
>>> folder = tempfile.mkdtemp()
>>> with RunLock(folder) as lock:
...     lock.holder()["pid"] == os.getpid()
True
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from merge3._errors import Merge3Error
from merge3.models import no_link_fd

LOCK_FILE = ".lock"


class RunLock:
    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None
        self.took_over: dict | None = None  # the holder of a stale lock, when one was taken over

    def acquire(self) -> RunLock:
        fd = no_link_fd(self.path, os.O_RDWR | os.O_CREAT, "the run's lock")  # never a link: it is truncated below
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}" if holder
                   else "another process")
            raise Merge3Error(f"run '{self.path.parent}' is being written by {who}: wait for it to finish, or stop it "
                              "and then `merge3 resume` it") from None
        previous = _read(fd)
        if previous:  # a holder releases by emptying the file: this one died holding it (the kernel dropped its flock)
            self.took_over = previous
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def holder(self) -> dict:
        return _read(self._fd) if self._fd is not None else {}

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty lock file: nobody holds the run
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        data = json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {"note": "an unreadable holder"}  # edited by hand: still a holder
