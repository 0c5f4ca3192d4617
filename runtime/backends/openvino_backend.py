"""OpenVINO backend (CPU): compiles the exported ONNX with an explicit inference precision.

Shapes: by default one static-shape model is compiled per batch size met (max batch at construction, others on
first use), since OpenVINO's CPU plugin re-plans a dynamic-batch model on every call. Measured on 2 busy cores,
median ms per eps call, static vs the dynamic-batch model: 1.1 M-param 16x16 UNet 20 vs 33 (batch 1) and
54 vs 80-130 (batch 8); cifar10-32 UNet batch 1 about the same (361 vs 327-462). `static_shapes=False` keeps
the ONNX's dynamic batch axis (one compile, no per-size compile time).

Graph: by default the model is read with graph.rewrite's GroupNormalization -> InstanceNormalization rewrite
(the onnxruntime CPU backend's), which also measured faster here: median ms 15.8 vs 17.9 (16x16 UNet, batch 1),
48.6 vs 57.9 (batch 8), 404 vs 497 (cifar10-32, batch 1), same eps within 1.1e-6. `rewrites=False` reads the
file as exported.

Why explicit: OpenVINO's CPU plugin picks bf16 by itself on CPUs that have it (AVX512_BF16 / AMX) and, when
bf16 is asked for on a CPU without it, silently runs f32. Here `precision` is always written into
INFERENCE_PRECISION_HINT, bf16 is refused up front on a CPU whose OPTIMIZATION_CAPABILITIES lack BF16, and the
compiled model's own precision is read back and checked, so a run is never in a precision nobody asked for.

Cache: OpenVINO writes its compiled-model blobs in place and maps them into the processes that load them, so two
processes compiling one model into one cache raced: 4 concurrent compiles of the shipped model once died of SIGBUS
(Bus error) and 1 of 20 concurrent `run`s failed to compile. Compiles that use the cache hold an
exclusive lock on CACHE_DIR/.ddpm-deploy.lock, and blobs are read into memory (ENABLE_MMAP off), so no process
reads a blob while another writes it, and a blob rewritten later cannot change a running model's weights. A blob
that fails the probe step after loading is replaced by a fresh compile's, renamed over it (`_checked`).
A compile waiting for that lock says so, naming the holder's pid (each holder writes it into the lock file), after
a few seconds, and after $DDPM_DEPLOY_CACHE_LOCK_WAIT_S (default 60) compiles without the cache; the lock file is
opened without following a symbolic link. Blobs are code this process runs: a cache folder owned by another user
(not root), or one anyone may write, is not used (one warning line).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from ... import backend_registry as registry
from ...errors import UserError, first_line
from ...files import folder_lock
from ...graph.fused import fused_model
from ...graph.rewrite import save_for_cpu
from ...loop.run import Backend
from ...artifact.fields import OPENVINO_SUFFIX
from ...artifact.manifest import load_onnx, read_int8_manifest
from ...fused_io import input_shapes
from ..cpu_steps import HostFusedSteps, cpu_steps
from .openvino_int8 import read_int8_model

PRECISIONS = {"fp32": "f32", "bf16": "bf16"}  # our name -> OpenVINO element type name
CACHE_LOCK = ".ddpm-deploy.lock"  # in CACHE_DIR: held by a compile that uses the cache (module docstring, "Cache")
# Waiting for that lock: a line after LOCK_NOTICE_S, and after the bound (seconds, this variable, default
# LOCK_WAIT_S) the compile goes on without the cache. A holder may be a `run` stopped with Ctrl-Z mid-compile: its
# lock lasts until it is resumed or ended. Compiling the shipped model takes ~1 s per batch size on 2 busy cores.
LOCK_WAIT_ENV = "DDPM_DEPLOY_CACHE_LOCK_WAIT_S"
LOCK_WAIT_S = 60.0
LOCK_NOTICE_S = 3.0


def import_openvino():
    """The openvino module, or a one-line UserError saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise UserError("--backend openvino needs the openvino package, which is not installed: "
                        f"{registry.get('openvino').install}") \
            from None
    return openvino


def default_cache_dir() -> str:
    """Compiled-model cache under the user's cache folder ($XDG_CACHE_HOME or ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ddpm-deploy", "openvino")


def openvino_message(e: BaseException) -> str:
    """The line of an OpenVINO error that says what went wrong: its messages start with lines of C++ locations
    ("Exception from src/inference/src/cpp/core.cpp:117:") and end with the reason."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    said = [ln for ln in lines if not ln.startswith("Exception from ")]
    return first_line(said[-1] if said else e)


FRESH_PREFIX = ".fresh-"   # a replacing compile's temp folder in the cache (OpenVinoBackend._compile_replacing_blob)
FRESH_STALE_S = 24 * 3600  # one this old was left by a killed process (a compile takes minutes at most)


def _remove_stale_fresh(cache: Path) -> None:
    """Temp folders of replacing compiles whose process was killed (TemporaryDirectory's cleanup never ran)."""
    now = time.time()
    for folder in cache.glob(FRESH_PREFIX + "*"):
        try:
            if now - folder.stat().st_mtime > FRESH_STALE_S:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # gone meanwhile, or not ours to remove
            pass


def lock_wait_s() -> float:
    """The bound on waiting for the cache lock: $DDPM_DEPLOY_CACHE_LOCK_WAIT_S seconds, else LOCK_WAIT_S."""
    text = os.environ.get(LOCK_WAIT_ENV)
    if text is None:
        return LOCK_WAIT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 24 * 3600:
        raise UserError(f"{LOCK_WAIT_ENV}={text!r}: give the seconds to wait for the OpenVINO cache lock "
                        "(0 to 86400)")
    return value


def holder_text(pid: int | None) -> str:
    """Who holds a lock, for a person: 'process 123 (python3, stopped: resume it with fg or end it)'."""
    if pid is None:
        return "another process (it recorded no pid)"
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        name, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()[0]
    except (OSError, ValueError, IndexError):
        return f"process {pid}"
    return f"process {pid} ({name}" + (", stopped: resume it with fg, or end it)" if state in "Tt" else ")")


def untrusted_cache(cache: str) -> str | None:
    """Why the blobs of the cache folder `cache` must not be loaded (None: they may): a folder another user (not
    root) owns, or one anyone may write, can hold a blob planted under the name OpenVINO will look up, and a blob
    is code and weights this process would run."""
    try:
        st = os.stat(cache)
    except OSError as e:
        return f"cannot stat it ({e.strerror})"
    if st.st_uid not in (os.geteuid(), 0):
        return f"it is owned by user id {st.st_uid}, not by this user ({os.geteuid()}) or root"
    if st.st_mode & 0o002:
        return f"anyone may write it (mode {st.st_mode & 0o7777:o})"
    return None


def device_supports_bf16(core, device: str) -> bool:
    return "BF16" in core.get_property(device, "OPTIMIZATION_CAPABILITIES")


def compile_config(precision: str, threads: int | None, cache_dir: str) -> dict:
    """The properties we set, by OpenVINO name. LATENCY: the reverse chain is one request at a time."""
    config = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if cache_dir:
        config["CACHE_DIR"] = cache_dir
    return config


def _plain(value):
    """A property value as plain text: element types by their OpenVINO name (f32, bf16), enums by value name."""
    if hasattr(value, "get_type_name"):
        return value.get_type_name()
    if hasattr(value, "name") and not isinstance(value, (str, int)):
        return str(value.name)
    return value if isinstance(value, (int, str, bool, float)) else str(value)


class OpenVinoBackend(Backend):
    """eps_theta on OpenVINO. `precision` "fp32" or "bf16" (bf16 needs a CPU with BF16), `threads` None for
    OpenVINO's choice, `cache_dir` None for default_cache_dir() and "" to switch the compiled-model cache off;
    `static_shapes` and `rewrites` as in the module's docstring. What is compiled is the fused step graph
    (runtime.cpu_steps): `fused_step=False` keeps the numpy host loop for fp32 models too (for comparisons)."""

    def __init__(self, path: str, precision: str = "fp32", threads: int | None = None, cache_dir: str | None = None,
                 device: str = "CPU", static_shapes: bool = True, rewrites: bool = True, fused_step: bool = True):
        if precision not in PRECISIONS:
            raise UserError(f"unknown precision {precision!r} for the OpenVINO backend: choose fp32 or bf16")
        if threads is not None:
            registry.checked_threads(threads)
        ov = import_openvino()
        super().__init__()
        self._ov = ov
        self.int8 = Path(path).suffix == OPENVINO_SUFFIX  # an int8 model of `export --int8` (the fused graph)
        proto, self.manifest = (None, read_int8_manifest(path)) if self.int8 else load_onnx(path)
        self.path, self.precision, self.device = str(path), precision, str(device).upper()
        self.name = "openvino-int8" if self.int8 else f"openvino-{precision}"
        self.max_batch = self.manifest.max_batch
        self.static_shapes = bool(static_shapes)
        self._core = ov.Core()
        self._core.set_property({"ENABLE_MMAP": False})  # cached blobs read, not mapped: see the module's "Cache"
        self._check_device(self._core, precision)
        cache_dir = default_cache_dir() if cache_dir is None else str(cache_dir)
        self._properties = compile_config(precision, threads, cache_dir)  # what OpenVINO gets, by its names
        self._make_cache_dir()
        # Kept for the backend's life: each new batch size reshapes and compiles it (holds one copy of the weights).
        if self.int8:
            self._model, self.rewritten_norms = read_int8_model(self._core, path, self.manifest, precision), 0
        else:
            self._model, self.rewritten_norms = self._read_model(proto, rewrites)
        self._compiled: dict = {}  # batch size (None: the dynamic model) -> (compiled model, its properties)
        self._cpu = HostFusedSteps(self.manifest, self.name, self._bind)
        self.steps = cpu_steps(self._cpu, fused_step)
        self.fused_loop = self.steps is self._cpu  # else the numpy host loop (fp16 files, or asked for)
        first = self._compiled_for(self.max_batch)
        # For reports: the properties set, what the compiled model reports back, and the shape choice.
        self.config = {**self._properties, **first[1],
                       "batch_shapes": "static per batch size" if self.static_shapes else "dynamic",
                       "group_norm_rewrites": self.rewritten_norms,
                       "loop": "fused step in the engine" if self.fused_loop else "numpy host loop"}

    @property
    def compiled_batches(self) -> list:
        """Batch sizes compiled so far (static shapes), for reports."""
        return sorted(b for b in self._compiled if b is not None)

    def _compiled_for(self, batch: int):
        key = batch if self.static_shapes else None
        entry = self._compiled.get(key)
        if entry is None:
            compiled = self._checked(self._compile(key), key, batch)
            props = self._compiled_properties(compiled)
            self._check_precision(props)
            entry = self._compiled[key] = (compiled, props)
        return entry

    def _bind(self, batch: int, buffers: dict):
        """cpu_steps' Binder: one infer request per batch size, its tensors sharing `buffers`' memory."""
        compiled = self._compiled_for(batch)[0]
        request = compiled.create_infer_request()
        for port in [*compiled.inputs, *compiled.outputs]:
            # a port has several tensor names (get_any_name may give an internal one, e.g. "mul_1" for t)
            name = next(n for n in port.get_names() if n in buffers)
            request.set_tensor(port, self._ov.Tensor(buffers[name], shared_memory=True))
        # share_outputs: infer() also returns the outputs, as views of `buffers` then, not as copies nobody reads
        return lambda: request.infer(share_outputs=True)

    def _check_device(self, core, precision: str) -> None:
        if self.device not in core.available_devices:
            raise UserError(f"OpenVINO device {self.device!r} not available here "
                            f"(has {', '.join(core.available_devices)}); use CPU")
        if precision == "bf16" and not device_supports_bf16(core, self.device):
            caps = ", ".join(core.get_property(self.device, "OPTIMIZATION_CAPABILITIES"))
            raise UserError(f"--precision bf16: this {self.device} has no bf16 support (OpenVINO reports {caps}; "
                            "bf16 needs AVX512_BF16 or AMX); use --precision fp32")

    def _make_cache_dir(self) -> None:
        cache = self._properties.get("CACHE_DIR")
        if cache:
            try:
                Path(cache).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create the OpenVINO cache folder {cache}: "
                                f"{e.strerror}; pass another cache_dir or '' to disable it") from None
            why = untrusted_cache(cache)
            if why is not None:
                print(f"warning: not using the OpenVINO cache folder {cache}: {why}; compiling without a cache (make "
                      "it yours and not world-writable, or pass another cache_dir)", file=sys.stderr)
                del self._properties["CACHE_DIR"]
                return
            _remove_stale_fresh(Path(cache))

    def _read_model(self, proto, rewrites: bool):
        """(ov.Model, number of GroupNormalizations rewritten) of the fused step graph made from the eps graph
        `proto`, rewritten unless `rewrites` is False. It goes through a temporary file, which OpenVINO has read
        before it is deleted."""
        try:
            fused = fused_model(proto, self.manifest, os.path.dirname(os.path.abspath(self.path)))
            with tempfile.TemporaryDirectory(prefix="ddpm_deploy_ov_") as tmp:
                path, count = save_for_cpu(fused, tmp, rewrites)
                return self._core.read_model(path), count
        except Exception as e:  # OpenVINO's errors are multi-line C++ traces; keep the first line
            raise UserError(f"OpenVINO cannot read {self.path}: {openvino_message(e)}") from None

    def _checked(self, compiled, key: int | None, batch: int):
        """`compiled`, once a probe step of it is finite; a compiled model from OpenVINO's cache that is not gets
        compiled again, and its blob in the cache is replaced by the new one when that is finite (so the next run
        is not warned again). Why: on this project's CI-class VM a cached bf16 blob (batch 1 and 16 of the shipped
        model) gave NaN for half the images of every step, while the same model compiled afresh was finite (the
        fused step's flags refused those requests; this keeps the server from refusing all of them)."""
        if self._probe_finite(compiled, batch):
            return compiled
        cache = self._properties.get("CACHE_DIR")
        if cache:
            compiled, replaced = self._compile_replacing_blob(key, batch, cache)
            if compiled is not None:
                print(f"warning: OpenVINO's cached compiled model of {self.path} (batch {batch}, {self.precision}) "
                      "gave non-finite output; compiled it again and "
                      + (f"replaced it in {cache}" if replaced else
                         f"ran that (delete {cache} to rebuild the cache)"), file=sys.stderr)
                return compiled
        raise UserError(f"OpenVINO's {self.precision} compile of {self.path} gives non-finite output at batch {batch} "
                        "on a probe step: run it with --precision fp32 or --backend onnxruntime")

    def _compile_replacing_blob(self, key: int | None, batch: int, cache: str):
        """(a fresh compile, whether its blob replaced the cache's) or (None, False) when it is not finite either.
        Compiled into an empty cache folder inside `cache`: the one blob written there has the name of the bad
        one (OpenVINO names blobs by model, device and settings, not by folder) and replaces it by a rename, so a
        process reading the cache sees the old blob or the new one, never a part."""
        try:
            fresh = tempfile.TemporaryDirectory(dir=cache, prefix=FRESH_PREFIX)
        except OSError:  # a cache we may read but not write: compile without it
            compiled = self._compile(key, cache_dir="")
            return (compiled if self._probe_finite(compiled, batch) else None), False
        with fresh:
            compiled = self._compile(key, cache_dir=fresh.name)
            if not self._probe_finite(compiled, batch):
                return None, False
            blobs = list(Path(fresh.name).glob("*.blob"))
            if len(blobs) != 1 or not (Path(cache) / blobs[0].name).is_file():
                return compiled, False
            os.replace(blobs[0], Path(cache) / blobs[0].name)
            return compiled, True

    def _probe_finite(self, compiled, batch: int) -> bool:
        """Whether steps of `compiled` (eps of seeded N(0, I) images with zero coefficients at t = T - 1, 0.9 T and
        T / 2: where chains start, and where the bad cached blobs failed) are finite: eps and `nonfinite` flags."""
        shapes, T = input_shapes(self.manifest, batch), self.manifest.schedule.T
        feeds = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
        feeds["x_t"] = np.random.default_rng(0).standard_normal(shapes["x_t"], dtype=np.float32)
        request = compiled.create_infer_request()
        for port in compiled.inputs:
            request.set_tensor(port, self._ov.Tensor(feeds[next(n for n in port.get_names() if n in feeds)],
                                                     shared_memory=True))
        for t in (T - 1, 9 * T // 10, T // 2):
            feeds["t"][:] = t  # shared with the request's input tensor
            request.infer()
            out = {n: request.get_tensor(port).data for port in compiled.outputs for n in port.get_names()}
            if not np.isfinite(out["eps"]).all() or np.any(out["nonfinite"] != 0):
                return False
        return True

    def _compile(self, batch: int | None, cache_dir: str | None = None):
        """Compile for one static batch size, or (None) with the ONNX's dynamic batch axis; `cache_dir` a folder in
        place of the backend's cache folder, "" for none."""
        properties = self._properties
        if cache_dir is not None:
            properties = {k: v for k, v in properties.items() if k != "CACHE_DIR"}
            properties.update({"CACHE_DIR": cache_dir} if cache_dir else {})
        with ExitStack() as turn:
            if "CACHE_DIR" in properties and not self._take_turn(turn, properties["CACHE_DIR"]):
                properties = {k: v for k, v in properties.items() if k != "CACHE_DIR"}
            try:
                if batch is not None:
                    self._model.reshape({name: list(shape)
                                         for name, shape in input_shapes(self.manifest, batch).items()})
                return self._core.compile_model(self._model, self.device, properties)
            except Exception as e:
                raise UserError(f"OpenVINO cannot compile {self.path}: {openvino_message(e)}") from None

    def _take_turn(self, turn: ExitStack, cache: str) -> bool:
        """Hold the cache's lock in `turn` for this compile: False when the compile must go without the cache (the
        lock file is a symbolic link, or another process held the lock past the bound; one line each), and so do
        this backend's later compiles (one wait, not one per batch size)."""
        lock = os.path.join(cache, CACHE_LOCK)
        bound = lock_wait_s()

        def say_waiting(pid):
            print(f"waiting for the OpenVINO cache lock {lock}, held by {holder_text(pid)}; compiling without the "
                  f"cache after {bound:g} s ({LOCK_WAIT_ENV})", file=sys.stderr, flush=True)

        try:
            held = turn.enter_context(folder_lock(cache, CACHE_LOCK, timeout=bound,
                                                  notice_after=min(LOCK_NOTICE_S, bound / 2), on_wait=say_waiting,
                                                  record_pid=True))
        except OSError:
            if not os.path.islink(lock):
                return True   # a cache folder we may not write: nobody writes it, so no turns to take
            print(f"warning: the OpenVINO cache lock {lock} is a symbolic link: compiling without the cache "
                  "(remove the link)", file=sys.stderr)
            held = False
        else:
            if not held:
                print(f"warning: the OpenVINO cache lock {lock} was still held after {bound:g} s: compiling "
                      f"{self.path} without the cache", file=sys.stderr, flush=True)
        if not held and self._properties.get("CACHE_DIR") == cache:
            del self._properties["CACHE_DIR"]
        return held

    @staticmethod
    def _compiled_properties(compiled) -> dict:
        """What a compiled model actually runs with, as reported by OpenVINO (for reports)."""
        out = {}
        for key in ("INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS", "EXECUTION_MODE_HINT",
                    "PERFORMANCE_HINT"):
            try:
                out[f"compiled.{key}"] = _plain(compiled.get_property(key))
            except RuntimeError:  # a property this OpenVINO version does not report
                pass
        return out

    def _check_precision(self, props: dict) -> None:
        got, want = props.get("compiled.INFERENCE_PRECISION_HINT", ""), PRECISIONS[self.precision]
        if got and got != want:
            raise UserError(f"OpenVINO compiled {self.path} for {got} instead of the requested {want}; "
                            "refusing to run in a precision that was not asked for")

    def close(self) -> None:
        super().close()
        self._cpu.close()
        self._compiled = {}
        self._model = None
