"""What the HTTP layer (embedded or on Ray Serve) calls: one opened model, its step batcher, request checks and
response encoding. No web framework here. (Its one local import, Pillow, is needed for png responses only.)"""

from __future__ import annotations

import collections
import functools
import io
import os
import re
import zipfile
from dataclasses import dataclass

import numpy as np

from .. import backend_registry as registry
from ..errors import UserError
from ..images import to_uint8
from ..artifact.manifest import kind_of
from ..app.opener import open_pipeline
from ..sampling.spec import FIELDS, SamplerSpec, default_sampler
from ..sampling.plan import SamplingPlan
from .batcher import Job, StepBatcher

FORMATS = ("png", "npy")
DEFAULT_MAX_N = 64
DEFAULT_MAX_BODY = 16 * 1024          # a /generate body is ~100 bytes; anything near this is not a request
BODY_FIELDS = ("n", "seed", *FIELDS, "format")   # FIELDS: SamplerSpec's, sampler ... spacing


@dataclass(frozen=True)
class ServeConfig:
    """Everything a server (or a Ray Serve replica) needs to open its own runtime."""

    engine: str
    max_batch: int | None = None       # rows advanced per step (default: the engine's max batch)
    max_n: int = DEFAULT_MAX_N         # images per request
    max_queued_rows: int = 4096
    max_body: int = DEFAULT_MAX_BODY
    device: str = "cpu"
    backend: str | None = None
    precision: str | None = None       # of a backend with precisions (openvino: fp32 / bf16)
    threads: int | None = None
    batching: str = "step"             # "request": one request at a time (the load test's baseline)
    # connection limits (embedded server; see app.py): seconds and counts, `ddpm-deploy serve --help`
    header_timeout: float = 10.0       # a request head must arrive within this
    body_timeout: float = 10.0         # the whole body must arrive within this after the head
    keep_alive_timeout: float = 5.0    # an idle kept-alive connection is closed after this
    limit_concurrency: int = 128       # POST /generate requests in flight; beyond: 503 at once (the app)
    max_connections: int = 256         # open sockets; beyond: the oldest idle one closes, or 503 (bounds descriptors)
    max_connections_per_client: int = 64   # the same, per remote address
    drain_timeout: float = 10.0        # SIGTERM: open requests get this long, then 503 "server shutting down"


@dataclass(frozen=True)
class GenerateRequest:
    n: int
    seed: int
    spec: SamplerSpec   # checked; its sampler is named (the model's default filled in)
    format: str


class Service:
    """One runtime and its batcher. `plan_for` checks a request (UserError: the one-line 4xx reason)."""

    def __init__(self, config: ServeConfig):
        if config.max_n <= 0:
            raise UserError(f"--max-n must be positive, got {config.max_n}")
        if config.max_batch is not None and config.max_batch <= 0:
            raise UserError(f"--max-batch must be positive, got {config.max_batch}")
        check_limits(config)
        self.config = config
        self.pipe = open_pipeline(config.engine, config.device, fixed_backend(config.engine, config.backend),
                                  config.precision, config.threads)
        self.manifest = self.pipe.manifest
        self.batcher = StepBatcher(self.pipe.backend, config.max_batch, config.max_queued_rows, config.batching)
        self.counters: collections.Counter = collections.Counter()   # HTTP-level refusals (timeouts, 408, 413 ...)
        self.in_flight = 0   # POST /generate requests between their head and their response (the HTTP app's count)

    def close(self) -> None:
        self.batcher.close()
        self.pipe.close()

    def parse(self, body: dict) -> GenerateRequest:
        """Check the JSON body of POST /generate; every problem is one line naming the field and the fix."""
        if not isinstance(body, dict):
            raise UserError("the body must be a JSON object like {\"n\": 4, \"seed\": 0}")
        unknown = sorted(set(body) - set(BODY_FIELDS))
        if unknown:
            raise UserError(f"unknown field(s) {', '.join(unknown)}: allowed {', '.join(BODY_FIELDS)}")
        n = _int(body.get("n", 1), "n")
        if not 1 <= n <= self.config.max_n:
            raise UserError(f"n must be between 1 and {self.config.max_n} (this server's cap), got {n}")
        seed = _int(body.get("seed", 0), "seed")
        if not 0 <= seed < 2 ** 63:
            raise UserError(f"seed must be a non-negative 64-bit integer, got {seed}")
        # the sampler fields: the same SamplerSpec (and refusals) as the CLI and the Python API
        spec = SamplerSpec(**{k: body[k] for k in FIELDS if k in body and body[k] is not None})
        spec = spec.with_default(default_sampler(self.manifest.distilled))
        fmt = body.get("format", "png")
        if fmt not in FORMATS:
            raise UserError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self.plan_for(spec)   # the rules that need the model (steps <= T, a distilled grid): 422 here too
        return GenerateRequest(n, seed, spec, fmt)

    def submit(self, req: GenerateRequest) -> Job:
        return self.batcher.submit(req.n, req.seed, self.plan_for(req.spec))

    @functools.lru_cache(maxsize=64)
    def plan_for(self, spec: SamplerSpec) -> SamplingPlan:
        return self.pipe.plan(spec=spec)

    def info(self) -> dict:
        """The manifest, with the source checkpoint by file name only (a client learns no host path)."""
        m = self.manifest.to_dict()
        m["source"] = {**m["source"], "name": file_name(m["source"]["name"])}
        return m

    def health(self) -> dict:
        return {"status": "ok", "pid": os.getpid(), "backend": self.pipe.backend.name,
                "batching": self.batcher.batching, "in_flight": self.in_flight, **self.batcher.stats(),
                **self.counters}


def check_limits(config: ServeConfig) -> None:
    """The connection limits of `ddpm-deploy serve`, one line each."""
    for name in ("header_timeout", "body_timeout", "keep_alive_timeout", "drain_timeout"):
        v = getattr(config, name)
        if not 0 < v <= 3600:
            raise UserError(f"--{name.replace('_', '-')} must be between 0 and 3600 seconds, got {v}")
    for name in ("limit_concurrency", "max_connections", "max_connections_per_client", "max_queued_rows"):
        if getattr(config, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
    if config.max_connections <= config.limit_concurrency:
        raise UserError(f"--max-connections ({config.max_connections}) must be > --limit-concurrency "
                        f"({config.limit_concurrency}): with every request slot taken, a health check still needs "
                        "a socket")
    if config.max_queued_rows < config.max_n:
        raise UserError(f"--max-queued-rows ({config.max_queued_rows}) must be >= --max-n ({config.max_n}): "
                        "a full-size request could never be queued")


def file_name(path: str) -> str:
    """The last component of a POSIX or Windows path ('' stays ''); a shipped name like 'digits' is kept."""
    return re.split(r"[\\/]", path.rstrip("/\\"))[-1]


def fixed_backend(engine: str, backend: str | None) -> str | None:
    """A file that would run on auto (an .onnx) runs on the registry's default for it without auto (onnxruntime)
    unless a backend is named: auto (the fastest verified CPU candidate, possibly bf16) may choose differently per
    replica or worker, and images must not depend on which process made them. Other files keep None (the default;
    it is part of a generate job's recorded identity)."""
    kind = kind_of(str(engine))
    if backend is None and registry.default_backend(kind) == registry.AUTO:
        return registry.default_backend(kind, allow_auto=False)
    return backend


def _int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise UserError(f"{name} must be an integer, got {v!r}")
    return v


def encode(x0: np.ndarray, fmt: str) -> tuple[bytes, str]:
    """npy: the float32 x_0 array (n, C, H, W) as a .npy file. png: a zip of one PNG per image (00000.png, ...),
    uint8 exactly as `ddpm-deploy run` rounds them (`images.to_uint8`)."""
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(x0, dtype=np.float32))
        return buf.getvalue(), "application/x-npy"
    from PIL import Image  # Pillow: only for png responses

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for i, img in enumerate(to_uint8(x0)):
            png = io.BytesIO()
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(png, format="PNG")
            zf.writestr(f"{i:05d}.png", png.getvalue())
    return buf.getvalue(), "application/zip"
