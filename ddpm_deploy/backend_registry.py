"""The one list of backends: name -> class, the files it opens, the devices and options it accepts, its precision
rules, whether it is CPU-threaded, whether backend auto may choose it, and how to install it.

`runtime.load` / `open_backend`, backend auto's candidates and cache check, the CLI's --backend / --device /
--precision choices, bench and serve all read this table; adding a backend is one entry here plus its own file.

Why here, in the core layer, and not in `ddpm_deploy.runtime`: it is pure data (like `extras`), and the CLI reads it
to build its choices at start-up; importing anything under `ddpm_deploy.runtime` runs the runtime package's
`__init__` (numpy, the manifest, the pipeline: ~100 ms before `--help` could answer). Classes are named as
"module:Class" strings and imported only when a backend is opened, so this module imports no library at all.

The PyTorch reference ("torch", `ddpm_deploy.nn`) is an entry too, marked `runtime=False`: the app layer
(`app.opener.open_pipeline`, the CLI, bench, serve) offers it, while the runtime never opens it (the runtime never
imports torch; `runtime.load(..., backend="torch")` is refused as an unknown backend).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass

from .errors import UserError

AUTO = "auto"                             # not a backend: "the fastest verified CPU entry" (ddpm_deploy.runtime.auto)
DEVICES = ("cpu", "cuda", "tensorrt")     # --device: onnxruntime's execution providers; other entries accept a subset


@dataclass(frozen=True)
class BackendEntry:
    """One backend. `needs` completes "backend NAME ..., got PATH" when given a file of another kind."""

    name: str
    cls: str                          # "module:Class", imported on open only
    kinds: tuple[str, ...]            # manifest.kind_of kinds it opens: onnx, tensorrt, checkpoint
    needs: str                        # the refusal for another kind
    devices: tuple[str, ...]          # --device values it accepts
    options: tuple[str, ...]          # constructor keyword options it accepts (besides the path and `device`)
    precision_rule: str               # how its compute precision is decided (documentation and --help)
    precisions: tuple[str, ...] = ()  # --precision values, the first the default; (): as stored / as built
    cpu_checked: tuple[str, ...] = () # ... of those, offered by auto only where the CPU supports them (bf16)
    auto_precisions: tuple[str, ...] | None = None  # ... of those, the ones auto times (None: all)
    takes_device: bool = False        # the constructor takes device= (the runtime's --device)
    device_refusal: str = ""          # completes "backend NAME ...; --device D ..." for a device it does not accept
    cpu_threaded: bool = False        # `threads` sets its CPU threads (bench passes --threads on the CPU)
    auto: bool = False                # backend auto may choose it (only for .onnx files on the CPU)
    runtime: bool = True              # opened by ddpm_deploy.runtime (False: the PyTorch reference, ddpm_deploy.nn)
    default_for: tuple[str, ...] = () # the kinds it runs when no backend is named (an .onnx on the CPU: auto)
    library: str = ""                 # the top-level module it imports (availability, library versions)
    extra: str | None = None          # the pyproject extra that installs `library` (None: the base install)
    install: str = ""                 # how to install it, one line

    def load_class(self):
        """The backend class (imports its module: the backend's own heavy imports happen on construction)."""
        module, _, name = self.cls.partition(":")
        return getattr(importlib.import_module(module), name)

    def available(self) -> bool:
        """Whether its library is installed (cheap: no import)."""
        try:
            return importlib.util.find_spec(self.library) is not None
        except (ImportError, ValueError):  # ValueError: sys.modules[library] is None (import blocked)
            return False


_ENTRIES: list[BackendEntry] = [
    BackendEntry(
        name="onnxruntime", cls="ddpm_deploy.runtime.backends.onnxruntime_backend:OnnxRuntimeBackend",
        kinds=("onnx",), needs="needs an .onnx file", devices=DEVICES, takes_device=True,
        options=("threads", "cache_dir", "cpu_rewrites", "fused_step"),
        precision_rule="as stored: an fp32 .onnx runs in fp32, an fp16 export in fp16 (the reference of auto's check)",
        cpu_threaded=True, auto=True, default_for=("onnx",), library="onnxruntime",
        install="in the base install; --device cuda/tensorrt need onnxruntime-gpu: pip install \"ddpm-deploy[gpu]\""),
    BackendEntry(
        name="openvino", cls="ddpm_deploy.runtime.backends.openvino_backend:OpenVinoBackend",
        kinds=("onnx", "openvino"), needs="needs an .onnx file or an int8 .xml of `export --int8`", devices=("cpu",),
        device_refusal="runs on the CPU here; --device {device} is for onnxruntime",
        options=("precision", "threads", "cache_dir", "static_shapes", "rewrites", "fused_step"),
        precision_rule="fp32 (default) or bf16 (--precision, where the CPU has it); auto times fp32 only (bf16 gave "
                       "NaN now and then) and never runs an fp16 file on it (it would compute in f32/bf16, not the "
                       "exported precision)",
        precisions=("fp32", "bf16"), cpu_checked=("bf16",), cpu_threaded=True, auto=True, library="openvino",
        # auto times fp32 only: OpenVINO 2026.4.1's bf16 compiles gave NaN now and then on this project's Xeons
        # (a cached blob in CI, the shipped model's DDIM run under load, 17 batch-1 serve requests) past a finite
        # probe step; the flags refuse such output, but the default must not fail at random. --precision bf16
        # still runs it, flags on.
        auto_precisions=("fp32",),
        default_for=("openvino",),  # int8 .xml files: theirs alone (auto times .onnx files only)
        extra="openvino", install='pip install "ddpm-deploy[openvino]"'),
    BackendEntry(
        name="tensorrt", cls="ddpm_deploy.runtime.backends.tensorrt_backend:TensorRTBackend",
        kinds=("tensorrt",), needs="needs an engine built with `ddpm-deploy build`", devices=DEVICES,
        options=("device_id", "cuda_graph", "threads", "noise_window_bytes"),
        precision_rule="as built: the engine's precision is the ONNX's it was built from (--device is ignored: an "
                       "engine runs on its GPU)",
        default_for=("tensorrt",), library="tensorrt",
        install='pip install "ddpm-deploy[gpu]" (CUDA 13, driver R580+) or "ddpm-deploy[gpu-cu12]"'),
    BackendEntry(
        name="torch", cls="ddpm_deploy.nn.torch_backend:TorchBackend",
        kinds=("checkpoint",), needs="needs a checkpoint (.pt, a diffusers folder or a shipped name)",
        devices=DEVICES, takes_device=True, options=("max_batch", "threads", "schedule_overrides"),
        precision_rule="fp32 PyTorch eager (the reference)", cpu_threaded=True, runtime=False,
        default_for=("checkpoint",), library="torch", extra="torch", install='pip install "ddpm-deploy[torch]"'),
]


def entries(*, runtime: bool | None = None, auto: bool | None = None) -> list[BackendEntry]:
    """The entries in registry order, optionally only the runtime's (or not) / only auto's candidates (or not)."""
    return [e for e in _ENTRIES if (runtime is None or e.runtime == runtime) and (auto is None or e.auto == auto)]


def get(name: str) -> BackendEntry | None:
    return next((e for e in _ENTRIES if e.name == name), None)


def names(*, with_auto: bool = False, runtime: bool | None = None, auto: bool | None = None) -> tuple[str, ...]:
    """Backend names (with_auto: "auto" first), e.g. the runtime's: names(with_auto=True, runtime=True)."""
    return ((AUTO,) if with_auto else ()) + tuple(e.name for e in entries(runtime=runtime, auto=auto))


def precisions() -> tuple[str, ...]:
    """Every --precision value some backend accepts, in registry order (fp32, bf16)."""
    out: list[str] = []
    for e in _ENTRIES:
        out += [p for p in e.precisions if p not in out]
    return tuple(out)


def precision_backends() -> tuple[str, ...]:
    """The backends --precision applies to."""
    return tuple(e.name for e in _ENTRIES if e.precisions)


def takes_precision(name: str | None) -> bool:
    e = get(name) if name else None
    return bool(e and e.precisions)


def cpu_threaded(name: str | None) -> bool:
    e = get(name) if name else None
    return bool(e and e.cpu_threaded)


def default_backend(kind: str, device: str = "cpu", allow_auto: bool = True) -> str:
    """The backend a file of `kind` (manifest.kind_of) runs on when none is named: an .onnx on the CPU: auto
    (unless allow_auto=False); otherwise the entry whose `default_for` has the kind (.onnx: onnxruntime, an engine:
    tensorrt, a checkpoint: torch)."""
    if allow_auto and device == "cpu" and all(kind in e.kinds for e in entries(auto=True)):
        return AUTO
    return next((e.name for e in _ENTRIES if kind in e.default_for), "tensorrt")


def register(entry: BackendEntry) -> None:
    """Add (or replace) an entry: for plugins and tests. Lists built from the registry at import time (the CLI's
    click choices) see it only if it is registered before they are imported."""
    _ENTRIES[:] = [e for e in _ENTRIES if e.name != entry.name] + [entry]


def usable_cores() -> int:
    """The cores this process may run on: what every CPU-threaded backend's `threads` is capped at."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def checked_threads(n) -> tuple[int, str | None]:
    """A `threads` setting (--threads, load(threads=), a cached value) checked once for every CPU-threaded side:
    below 1 or not an integer is refused (onnxruntime would run "-3 threads", OpenVINO fail mid-run); above the
    usable cores it is capped at them, with the one line that says so (None when not capped): more threads than
    cores only fight over them (a tampered 3000 drove a 2-core machine's load average past 900)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"--threads must be at least 1, got {n!r}: leave it out for the default")
    cores = usable_cores()
    if n > cores:
        return cores, f"note: --threads {n} capped at the {cores} usable cores"
    return n, None
