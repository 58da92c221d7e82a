"""One writer per run folder: an exclusive lock file that every command writing a run or dataset folder takes.

The lock is the operating system's (flock on ``.headstyle.lock``), so it is released whenever its process ends,
however it ends; the file keeps the owner's pid, host and command for the refusal message and is removed on
release. A lock file whose owner is gone (its flock is free) is taken over with a note. A process may take the
same folder's lock again inside the block that holds it (a command and the trainer it runs).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".headstyle.lock"

# Locks this process holds: folder -> file descriptor.
_held: dict[Path, int] = {}


class FolderLockedError(RuntimeError):
    """Another live process writes into the folder."""


def launched_main() -> bool:
    """Whether this is the main process of its launch: RANK 0 under torch.distributed's launchers and accelerate
    (which set RANK before the command runs), or a process launched alone."""
    return int(os.environ.get("RANK", "0")) == 0


def _owner() -> str:
    command = shlex.join(["headstyle", *sys.argv[1:]])
    return f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: {command}"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold ``folder``'s lock (created with the folder) for the block; FolderLockedError naming the owner when
    another live process holds it. Taking over a stale lock prints a note on stderr."""
    folder = Path(folder).resolve()
    if folder in _held:  # held by an enclosing block of this process, which releases it
        yield folder
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = _lock(path)
    previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if previous:
        print(f"note: took over the lock of {folder} from {previous} (no longer running)", file=sys.stderr)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (_owner() + "\n").encode(), 0)
    _held[folder] = fd
    try:
        yield folder
    finally:
        del _held[folder]
        path.unlink(missing_ok=True)  # still locked: a writer that opened it meanwhile sees it gone (_lock)
        os.close(fd)


def _lock(path: Path) -> int:
    """The locked file descriptor of ``path``, created if missing; FolderLockedError naming the live owner."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FolderLockedError(f"{path.parent} is being written by {owner}; wait for it to finish or stop it, "
                                    "or choose another folder") from None  # fmt: skip
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its owner removed it between our open and lock: lock the file now there
