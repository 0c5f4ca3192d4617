"""Files: atomic writes (temp file in the same folder, then rename), output-path checks, content hashes."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import UserError


def check_output_path(path: str | os.PathLike) -> Path:
    """The path of a file to write: its folder must exist and be writable, and the path must not be a folder.
    Called before any work starts, so a long run never ends in a PermissionError."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"output {path} is a folder: give a file path")
    if not path.parent.is_dir():
        raise UserError(f"output folder {path.parent} does not exist: create it or choose another path")
    _check_can_create(path.parent)
    return path


def check_writable_dir(folder: str | os.PathLike) -> Path:
    """A folder to write into, created later if missing: it must not be a file, and it (or, if it does not
    exist yet, its nearest existing parent) must accept new files."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output folder {folder} is a file: choose a folder path")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot create output folder {folder}: {existing} is a file")
    _check_can_create(existing)
    return folder


def _check_can_create(folder: Path) -> None:
    """Create and remove a probe file: os.access says yes to root even on read-only file systems."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".ddpm-deploy-write-test.", dir=folder)
    except OSError as e:
        raise UserError(f"output folder {folder} is not writable ({e.strerror}): choose another folder") from None
    os.close(fd)
    os.unlink(probe)


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` into a temp file next to `path`, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    write_bytes_atomic(text.encode(), path)


def _publish(tmp: str, path: Path) -> None:
    """mkstemp makes 0600 files; give the result the usual umask permissions, then rename into place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
