"""Files: atomic writes (temp file in the same folder, then rename), output-path checks, content hashes."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import UserError


def check_output_path(path: str | os.PathLike) -> Path:
    """The path of a file to write; its folder must exist (checked before any work starts)."""
    path = Path(path)
    if not path.parent.exists():
        raise UserError(f"output folder {path.parent} does not exist: create it or choose another path")
    return path


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
