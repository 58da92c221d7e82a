"""File helpers every floor may use: atomic writes (readers never see a half-written file or folder) and
content digests."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from headstyle.input_files import read_json_object

_CHUNK = 1 << 20


def content_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, in sorted order)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix) and move it onto ``path`` on success.

    Readers never see a half-written file; on an exception the temporary file is removed. The
    result has the usual permissions (0666 less the umask, e.g. 0644), whatever the writer used.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        # Created empty first, so the kernel applies the umask (reading the umask itself is not thread-safe).
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = stat.S_IMODE(tmp.stat().st_mode)
        yield tmp
        # Some writers replace the file with a private one (safetensors' save_file writes 0600).
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike, keep: Callable[[Path], bool] = lambda path: False) -> Iterator[Path]:
    """Yield a new hidden folder beside ``path`` (mode 0755) and move it onto ``path`` on success.

    Readers never see half a folder: an existing ``path`` is renamed aside before the new folder takes its
    name, then removed, unless ``keep(path)`` is true at that point (another writer finished first), when the
    new folder is dropped instead. On an exception the temporary folder is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    tmp.mkdir()
    tmp.chmod(0o755)
    try:
        yield tmp
        if not (path.is_dir() and keep(path)):
            _replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(new: Path, path: Path) -> None:
    """Rename the folder ``new`` to ``path``; a folder already there is moved aside first and removed after."""
    if not path.is_dir():
        os.replace(new, path)
        return
    old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.old")
    os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old, path)
        raise
    if old.is_symlink():
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text through atomic_path: readers never see a half-written file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_format_manifest(path: Path, fmt: str, error: type[ValueError], missing: str) -> dict:
    """The JSON object at ``path`` whose "format" is ``fmt`` (a manifest headstyle wrote), else ``error`` with one
    line: ``missing`` when there is no file, what read_json_object refuses (too large, too deep, not UTF-8, not JSON,
    not an object), or "not a <fmt> manifest". Versions are the caller's."""
    if not path.is_file():
        raise error(missing)
    manifest = read_json_object(path, error)
    if manifest.get("format") != fmt:
        raise error(f"{path}: not a {fmt} manifest")
    return manifest
