"""Files: atomic, durable writes (temp file in the same folder, fsync, rename, fsync the folder), output-path checks,
content hashes (of a file, and of a whole model: an .onnx with its external data, an engine with its sidecar)."""

from __future__ import annotations

import hashlib
import os
import tempfile
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
def folder_lock(folder: str | os.PathLike, name: str, wait: bool = True):
    """Hold FOLDER/NAME's exclusive lock (flock, across processes; released when the holder exits, killed or not).
    wait False: yields False at once when another process holds it, else True."""
    if fcntl is None:
        yield True
        return
    with open(Path(folder) / name, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
    it is refused), or another model file (an engine, an OpenVINO .xml with its .bin) and its manifest sidecar NAME.json (manifest.sidecar_path:
    the schedule lives there). A self-contained file hashes to its own file_sha256."""
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
