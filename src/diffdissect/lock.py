"""One writer per directory: an exclusive, advisory lock (flock) on `DIR/.diffdissect.lock` naming its holder.

The kernel drops a flock when its holder dies, however it dies (SIGKILL included), so a stale lock file never
blocks a resume: a second writer is refused only while the first one is alive. The file holds the holder's PID,
host and command, so the refusal can say who holds it. Stores, SAE runs, inverters and directions runs take it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from types import TracebackType

from diffdissect.errors import DiffdissectError

LOCK_NAME = ".diffdissect.lock"


class LockedError(DiffdissectError):
    """Another live process is writing into the same directory."""


class DirectoryLock:
    """``with DirectoryLock(directory, "capture"):`` holds the directory's write lock for the block.

    Re-entrant within one process (a capture inside a directions run locks two different directories; the same
    directory locked twice by one process is counted, not refused)."""

    _held: dict[str, tuple[int, int]] = {}  # resolved path -> (fd, depth), this process

    def __init__(self, directory: str | Path, what: str = "diffdissect"):
        self.directory = Path(directory)
        self.what = what
        self._key = ""

    def acquire(self) -> DirectoryLock:
        if self.directory.exists() and not self.directory.is_dir():
            raise DiffdissectError(f"{self.directory} is a file, not a directory; choose another output directory.")
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / LOCK_NAME
        self._key = str(path.resolve())
        if self._key in self._held:
            fd, depth = self._held[self._key]
            self._held[self._key] = (fd, depth + 1)
            return self
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise LockedError(
                f"{self.directory} is being written by another process ({holder}); two writers would mix their "
                "data. Wait for it to finish (or stop it), or choose another output directory."
            ) from None
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "what": self.what,
            "command": " ".join(sys.argv)[:500],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._held[self._key] = (fd, 1)
        return self

    def release(self) -> None:
        if self._key not in self._held:
            return
        fd, depth = self._held[self._key]
        if depth > 1:
            self._held[self._key] = (fd, depth - 1)
            return
        del self._held[self._key]
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        record = {}
    if not record:
        return "PID unknown"
    return f"PID {record.get('pid')} on {record.get('host')}, {record.get('what')}: {record.get('command', '')[:120]}"
