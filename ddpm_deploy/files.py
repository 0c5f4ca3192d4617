"""Files: atomic, durable writes (temp file in the same folder, fsync, rename, fsync the folder), output-path checks,
content hashes (of a file, and of a whole model: an .onnx with its external data, an engine with its sidecar)."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no cross-process locks here (the callers say what that leaves unguarded)
    fcntl = None


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
    """`write(tmp_path)` into a temp file next to `path`, then publish it: a crash never leaves a half-written file,
    and once this returns the file survives a power loss (contents fsynced before the rename, the folder after it),
    so a caller may record it as done."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    write_bytes_atomic(text.encode(), path)


def _publish(tmp: str, path: Path) -> None:
    """mkstemp makes 0600 files; give the result the usual umask permissions, flush it to disk, then rename it into
    place (without the fsync a rename can reach the disk before the data: an empty file under the final name)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    fd = os.open(tmp, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except IsADirectoryError:  # a folder where the file goes (the caller removes the temp file)
        raise UserError(f"cannot write {path}: a folder of that name is in the way; move it aside") from None


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable. Folders cannot be opened on Windows (nor fsynced there): skipped."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def folder_lock(folder: str | os.PathLike, name: str, wait: bool = True, timeout: float | None = None,
                notice_after: float | None = None, on_wait: Callable[[int | None], None] | None = None,
                record_pid: bool = False):
    """Hold FOLDER/NAME's exclusive lock (flock, across processes; released when the holder exits, killed or not).
    Yields True once held, False when not: at once when another process holds it and `wait` is False, or after
    `timeout` seconds of waiting (None: no limit). While waiting, `on_wait(pid)` is called once after
    `notice_after` seconds with the holder's pid (written into the lock file by holders with `record_pid`, cleared
    on release; None when none is recorded). The file is opened without following a symbolic link (OSError ELOOP):
    a link planted in a shared folder must not make us create or lock a file elsewhere."""
    if fcntl is None:
        yield True
        return
    fd = os.open(Path(folder) / name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    with os.fdopen(fd, "r+b") as f:
        if not _acquire(f, wait, timeout, notice_after, on_wait):
            yield False
            return
        try:
            if record_pid:
                _record_holder(f, os.getpid())
            yield True
        finally:
            if record_pid:
                _record_holder(f, None)
            fcntl.flock(f, fcntl.LOCK_UN)


def read_regular_file(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `max_bytes` (links to one are followed). A FIFO
    or a device is refused before a byte is read: opened non-blocking (opening a FIFO with no writer would block)
    and checked with fstat on the opened file, so nothing can be swapped in between. An OSError with a strerror
    says what is wrong (missing, not a regular file, too large)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"not a regular file ({_file_kind(st.st_mode)})", str(path))
        if st.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"{st.st_size} bytes, more than the {max_bytes} expected", str(path))
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)  # a file grown since fstat is read no further than this
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise OSError(errno.EFBIG, f"more than the {max_bytes} bytes expected (it grew while read)", str(path))
    return data


def read_npy(path: str | os.PathLike, max_values: int):
    """The numeric array in the .npy file `path` (never unpickled), its header checked before anything is sized from
    it: a regular file (read_regular_file) of at most `max_values` values of up to 16 bytes each, whose header
    claims at most `max_values` (a 128-byte file claiming 10**12 float64 made numpy ask for 7.3 TiB). A bad file is
    an OSError (unreadable) or a ValueError (not such a .npy), each with a one-line message."""
    import io

    import numpy as np

    data = read_regular_file(path, max_values * 16 + 65536)
    if data[:2] == b"PK":
        raise ValueError("an .npz archive, not one table saved with numpy.save")
    shape, _, dtype, offset = npy_header(data)
    count = 1
    for d in shape:
        count *= d
    if any(d < 0 for d in shape):
        raise ValueError(f"its header claims shape {shape[:4]}")
    if count > max_values:
        raise ValueError(f"its header claims shape {shape[:4]} ({count} values), more than {max_values}")
    if dtype.hasobject:
        raise ValueError("an object array (it would need unpickling)")
    if len(data) - offset < count * dtype.itemsize:
        raise ValueError(f"{len(data) - offset} data bytes, less than its header's {count * dtype.itemsize}")
    return np.load(io.BytesIO(data), allow_pickle=False)


def npy_header(data: bytes) -> tuple:
    """(shape, fortran_order, dtype, data offset) of the .npy bytes `data`, read from its header alone (nothing is
    sized from the claim here); a ValueError with a one-line message when it is not a readable .npy."""
    import io

    import numpy as np

    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"format version {version}")
        shape, fortran_order, dtype = read_header(buf)
    except (ValueError, EOFError, OSError) as e:
        raise ValueError(f"not a readable .npy file ({str(e).splitlines()[0][:80] if str(e) else ''})") from None
    return shape, fortran_order, dtype, buf.tell()


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"


def _acquire(f, wait: bool, timeout: float | None, notice_after: float | None, on_wait) -> bool:
    """flock `f`, polling when there is a time limit or a notice to give (flock itself waits without either)."""
    if wait and timeout is None and on_wait is None:
        fcntl.flock(f, fcntl.LOCK_EX)
        return True
    start, pause, noticed = time.monotonic(), 0.02, False
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        waited = time.monotonic() - start
        if not wait or (timeout is not None and waited >= timeout):
            return False
        if on_wait is not None and not noticed and waited >= (notice_after or 0):
            noticed = True
            on_wait(lock_holder(f))
        time.sleep(pause)
        pause = min(2 * pause, 0.2)


def _record_holder(f, pid: int | None) -> None:
    """The holder's pid in the lock file (what a waiter names), cleared on release. Best effort: a lock file we
    may not write still locks."""
    try:
        f.seek(0)
        f.truncate()
        if pid is not None:
            f.write(f"{pid}\n".encode())
        f.flush()
    except OSError:
        pass


def lock_holder(f) -> int | None:
    """The pid a holder recorded in the open lock file `f` (None: none recorded, or not a pid)."""
    try:
        f.seek(0)
        text = f.read(32).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and 0 < int(text) < 2 ** 31 else None


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_sha256(path: str | os.PathLike) -> str:
    """sha256 of everything that decides what a model computes, for keys that must change with its weights:
    an .onnx and every external-data file its tensors name (resolved inside the model's folder; a location outside
    it is refused), or another model file (an engine, an OpenVINO .xml with its .bin) and its manifest sidecar
    NAME.json (manifest.sidecar_path: the schedule lives there). A self-contained file hashes to its own file_sha256."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {path} not found")
    parts = _onnx_external_files(path) if path.suffix == ".onnx" else _sidecars(path)
    if not parts:
        return file_sha256(path)
    h = hashlib.sha256(f"{path.suffix}:{file_sha256(path)}\n".encode())
    for name, part in parts:
        h.update(f"{name}:{file_sha256(part)}\n".encode())
    return h.hexdigest()


def _sidecars(path: Path) -> list[tuple[str, Path]]:
    side = Path(str(path) + ".json")
    # an OpenVINO .xml (export --int8) keeps its weights in the .bin beside it
    weights = [path.with_suffix(".bin")] if path.suffix == ".xml" and path.with_suffix(".bin").is_file() else []
    return [(p.name, p) for p in weights + ([side] if side.is_file() else [])]


def _onnx_external_files(path: Path) -> list[tuple[str, Path]]:
    """(location, file) of every external-data file `path`'s tensors name, sorted, each resolved inside its folder."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's errors vary by version: one line either way
        raise UserError(f"{path} is not a readable ONNX file ({type(e).__name__}); re-export it") from None
    locations = set()
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in tensor.external_data}.get("location")
            if not location:
                raise UserError(f"{path}: tensor {tensor.name!r} is stored externally but names no file; re-export it")
            locations.add(location)
    return [(loc, _inside_folder(path, loc)) for loc in sorted(locations)]


def _inside_folder(model: Path, location: str) -> Path:
    """The external-data file `location` of `model`: refused unless it is a file inside the model's folder (after
    resolving '..' and links), so a hostile location cannot make us read, say, /etc/shadow."""
    folder = model.parent.resolve()
    target = (folder / location).resolve()
    if Path(location).is_absolute() or not target.is_relative_to(folder):
        raise UserError(f"{model}: external data location {location!r} is outside the model's folder {folder}; "
                        "refusing to read it (re-export the model with its weights next to it)")
    if not target.is_file():
        raise UserError(f"{model}: its external data file {location} is missing from {folder}; copy it next to the "
                        "model (or re-export)")
    return target


def _all_tensors(model):
    """Every TensorProto of a ModelProto that can hold data: initializers (sparse too) and tensor attributes, in
    subgraphs (If/Loop/Scan bodies) and in local functions too."""
    def graph(g):
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield from (sp.values, sp.indices)
        yield from nodes(g.node)

    def nodes(ns):
        for n in ns:
            for a in n.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                sparse = ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors)
                for sp in sparse:
                    yield from (sp.values, sp.indices)
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    yield from graph(g)

    yield from graph(model.graph)
    for f in model.functions:
        yield from nodes(f.node)
