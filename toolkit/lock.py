"""The run lock: one process at a time may own a run folder.

``{output_dir}/.{name}.lock`` is held with ``fcntl.flock`` for the whole run, by global rank 0. The kernel
drops the lock when its holder dies (even on SIGKILL), so a stale lock from a killed run is taken over
safely by the next run; the file itself only records who holds it, for the message a second run gets::

    chimera: error: runs/quickstart is in use by pid 4242 on node-3 (since 2026-11-30 06:31:02 UTC) ...

``flock`` is reliable on local disks and most cluster filesystems (Lustre and GPFS with flock enabled, NFSv4);
on a filesystem without it, point ``output_dir`` at one that has it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from toolkit.errors import ChimeraError


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir.parent / f".{self.run_dir.name}.lock"
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ChimeraError(
                f"{self.run_dir} is in use by {holder} (lock {self.path}); wait for that run to end, or start "
                "this one under another name (name=...)"
            ) from None
        os.ftruncate(fd, 0)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:
        info = {}
    if not info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.get("since", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} (since {since})"
