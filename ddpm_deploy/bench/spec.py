"""What to time: one `BenchSpec` (engines, backends, batches, steps, ...) instead of a dozen positional arguments."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .. import backend_registry as registry
from ..errors import UserError
from ..nn.torch_backend import idle_cores
from ..sampling.spec import DISTILLED, SamplerSpec


def runtime_backends() -> tuple[str, ...]:
    """The backends a bench row may name: "auto" (the runtime's CPU choice) and the registry's runtime entries."""
    return registry.names(with_auto=True, runtime=True)


def parse_int_list(text: str, what: str) -> list[int]:
    """'1,4,8' -> [1, 4, 8]; positive integers only."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} must be comma-separated positive integers like 1,4,8, got {text!r}") from None
    if not values or min(values) <= 0:
        raise UserError(f"{what} must be comma-separated positive integers like 1,4,8, got {text!r}")
    return sorted(set(values))


def parse_names(text: str | None, allowed: tuple, what: str) -> list:
    """'a,b' -> ['a', 'b'], each one of `allowed`; None -> [None] (the default)."""
    if text is None:
        return [None]
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if not names or bad:
        raise UserError(f"{what} must be one or more of {', '.join(allowed)} (comma-separated), got {text!r}")
    return names


def default_threads() -> int:
    """The cores this process may run on: one explicit number for every library, so the sides are comparable."""
    return registry.usable_cores()


@dataclass(frozen=True)
class BenchSpec:
    """One benchmark request. Every engine x backend (x OpenVINO precision) x batch is timed; with `checkpoint`
    also diffusers' pipeline on the same weights and, unless `torch_reference` is False, our PyTorch reference.
    `backends` None: the file's default (.onnx on the CPU: auto). `threads` None: all usable cores for the runtime
    sides and, for PyTorch and diffusers (`reference_threads`), the cores other work leaves idle at the start, the
    default of run/verify/eval's reference (torch's spinning OpenMP threads fight other work for busy cores)."""

    engines: tuple[str, ...] = ()
    checkpoint: str | None = None
    backends: tuple = (None,)
    precisions: tuple = (None,)
    device: str = "cpu"
    batches: tuple[int, ...] = (1, 4, 8)
    steps: int = 20
    sampler: str = "ddpm"
    # The timed chains' SamplerSpec (order, variant, spacing, eta too); None: SamplerSpec(sampler, steps). Given, its
    # sampler and steps (None: ddpm, 20) are what `sampler` and `steps` then say (the report reads those).
    sampling: SamplerSpec | None = None
    threads: int | None = None
    warmup: int = 3
    repeats: int = 3
    memory: bool = True
    model: str | None = None
    torch_reference: bool = True
    extra: dict = field(default_factory=dict, compare=False)  # free-form notes copied into the report's meta
    reference_threads: int = field(init=False, compare=False)  # PyTorch's and diffusers' threads, from `threads`

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen: normalise once, here)
        set_("engines", tuple(str(e) for e in self.engines))
        set_("backends", tuple(self.backends) or (None,))
        set_("precisions", tuple(self.precisions) or (None,))
        try:
            set_("batches", tuple(sorted(set(int(b) for b in self.batches))))
        except (TypeError, ValueError):
            raise UserError(f"batch sizes must be positive integers, got {self.batches}") from None
        set_("reference_threads", self.threads or idle_cores())  # taken now, before our own work loads the cores
        set_("threads", self.threads or default_threads())
        set_("model", self.model or Path(str(self.checkpoint or (self.engines or ("",))[0])).name)
        self._set_sampling(set_)
        self.check()

    def _set_sampling(self, set_) -> None:
        """sampling, sampler and steps from one of them (checked by SamplerSpec: run's rules and texts)."""
        if self.sampling is None:
            sampling = SamplerSpec(self.sampler, self.steps)
        elif (self.sampler, self.steps) != (BenchSpec.sampler, BenchSpec.steps):
            raise UserError("give sampling= or sampler=/steps=, not both")
        else:
            sampling = self.sampling.with_default(BenchSpec.sampler)
            sampling = dataclasses.replace(sampling, steps=sampling.steps or BenchSpec.steps)
        set_("sampling", sampling)
        set_("sampler", sampling.sampler)
        set_("steps", sampling.steps)

    def check(self) -> None:
        """Bad requests fail here, before anything is loaded."""
        if not self.engines and self.checkpoint is None:
            raise UserError("nothing to time: give --engine PATH (repeatable) and/or --checkpoint CKPT")
        for e in self.engines:
            if not Path(e).exists():
                raise UserError(f"engine {e} not found: export one with `ddpm-deploy export CHECKPOINT -o {e}`")
        for reference in registry.names(runtime=False):
            if reference in self.backends:
                raise UserError(f"--backend {reference} is the PyTorch reference: give --checkpoint CKPT instead")
        bad = [b for b in self.backends if b is not None and b not in runtime_backends()]
        if bad:
            raise UserError(f"unknown backend {bad[0]!r}: choose from {', '.join(runtime_backends())}")
        if any(self.precisions) and not any(map(registry.takes_precision, self.backends)):
            raise UserError(f"--precision applies to --backend {' or '.join(registry.precision_backends())} only")
        if not self.batches or min(self.batches) <= 0:
            raise UserError(f"batch sizes must be positive, got {list(self.batches)}")
        if self.sampler == DISTILLED:  # its chain has exactly the student's steps: no timed K, no warm-up chain
            raise UserError("bench times ddpm, ddim, dpmpp, dpmpp_sde or unipc chains: time a distilled student "
                            "with --sampler ddim --steps K")
        if self.repeats <= 0 or self.warmup < 0:
            raise UserError(f"--repeats must be positive and --warmup >= 0, got {self.repeats}, {self.warmup}")
        registry.checked_threads(self.threads)

    def configurations(self):
        """(engine, backend, precision) per runtime side; precisions apply to the backends that take one (OpenVINO)."""
        for engine in self.engines:
            for backend in self.backends:
                for precision in self.precisions if registry.takes_precision(backend) else (None,):
                    yield engine, backend, precision
