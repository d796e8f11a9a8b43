"""One runner per results folder: an exclusive `fcntl.flock` on FOLDER/runner.lock.

Why flock and not an O_EXCL file: the kernel releases a flock when its holder dies, kill -9 included, so a lock
can never be held by a dead process and no pid-reuse check (/proc/<pid>/stat start times) is needed. The file
records the holder (pid, start time, command) for the refusal message; it is emptied on release and never deleted
(deleting it would let a waiter lock the old inode while a newcomer locks a new one). A record found in a free
lock file was left by a runner that died holding it: the caller warns and takes over.
"""

from __future__ import annotations

import fcntl
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

LOCK_FILE = "runner.lock"


class FolderLocked(RuntimeError):
    """Another live runner holds the results folder."""


class FolderLock:
    """Exclusive use of a results folder by this process; `acquire` never waits."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self, command: str) -> dict[str, Any] | None:
        """Take the lock; returns the record a dead holder left behind (None if none). OSError: folder not writable."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise FolderLocked(
                f"results folder {self.path.parent} is in use by another samrepro runner ({describe(holder)}); "
                "wait for it to finish or stop it"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        left = _read(fd)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        record = json.dumps({"pid": os.getpid(), "started_at": now, "command": command}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        self.fd = fd
        return left

    def release(self) -> None:
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing the only descriptor releases the flock
        self.fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def describe(record: dict[str, Any] | None) -> str:
    if not record:
        return "pid not recorded yet: it is starting"
    return f"pid {record.get('pid')}, since {record.get('started_at')}: {record.get('command')}"


def _read(fd: int) -> dict[str, Any] | None:
    try:
        record = json.loads(os.pread(fd, 1 << 16, 0) or b"null")
    except ValueError:
        return None  # being written, or damaged: only ever used for messages
    return record if isinstance(record, dict) else None
