"""What to sample with: one frozen `SamplerSpec` (sampler, steps, eta, order, variant, spacing), checked once, here.

Every entry point takes the same value and so refuses the same things with the same line: `Pipeline.sample` /
`plan` (spec= or the separate keywords, `as_spec`), `verify_chain`, the CLI's run/verify/bench/generate (their
--sampler ... --spacing flags build one), POST /generate (its JSON fields are these names) and Ray (`GenerateSpec`
holds one; Ray Serve replicas run the same HTTP parse). Each rule has one text, naming the field as the Python
keyword and the JSON field spell it (the CLI flag is that name with --). The rules that need the model
(steps <= T, a distilled student's grid) are checked where the plan is built, `plan.make_plan`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from ..errors import UserError

SAMPLERS = ("ddpm", "ddim", "dpmpp", "dpmpp_sde", "unipc", "distilled", "lcm")
# DDIM (eta 0) on the grid a `ddpm-deploy distill` student records (Manifest.distilled): only such models take it.
DISTILLED = "distilled"
# Consistency multistep sampling (diffusers' LCMScheduler): x_0 at each step, re-noised with fresh noise to the next
# timestep of LCM's grid. Any model takes it; a `distill --method consistency` student records it as its default.
LCM = "lcm"
# Students that record their sampler (Manifest.distilled["sampler"]): progressive ones "distilled", consistency "lcm".
STUDENT_SAMPLERS = (DISTILLED, LCM)
# Samplers with an order, their allowed orders and default; UniPC's variants (the B(h) of Zhao et al.).
ORDERS = {"dpmpp": (1, 2, 3), "dpmpp_sde": (1, 2), "unipc": (1, 2, 3)}
DEFAULT_ORDER = 2
UNIPC_VARIANTS = ("bh1", "bh2")
SPACINGS = ("linspace", "leading", "trailing")
# diffusers' defaults: DDPMScheduler/DDIMScheduler "leading", DPMSolverMultistep/UniPCMultistep "linspace".
DEFAULT_SPACING = {"ddpm": "leading", "ddim": "leading", "dpmpp": "linspace", "dpmpp_sde": "linspace",
                   "unipc": "linspace"}
DEFAULT_STEPS = {"ddim": 50, "dpmpp": 20, "dpmpp_sde": 20, "unipc": 20, "lcm": 4}  # ddpm: all T
# What the CLI (run, verify, generate) and the server sample with when no sampler is named: DPM-Solver++ 2M SDE,
# 20 steps. On the shipped model its FD is at the real-vs-real floor (below DDPM-1000's) for 1/50 of the engine
# calls (README, "Quality per step budget"). The Python API keeps DDPM, the paper's chain, as its default.
DEFAULT_SAMPLER = "dpmpp_sde"
API_DEFAULT_SAMPLER = "ddpm"
# DDIM's eta (Song et al. eq. 16): 0 deterministic ... 1 DDPM's posterior variance. Above 1 the "direction
# pointing to x_t" coefficient sqrt(1 - a_prev - sigma^2) is imaginary (diffusers gives NaN; the plan would clamp
# it to 0, a sampler no paper defines), and a huge eta overflows only at the end of the chain, blamed on the engine.
ETA_RANGE = (0.0, 1.0)
FIELDS = ("sampler", "steps", "eta", "order", "variant", "spacing")


def student_sampler(distilled: dict | None) -> str | None:
    """The sampler a student records (a progressive one: "distilled", a consistency one: "lcm"); None if no student."""
    return distilled.get("sampler", DISTILLED) if distilled else None


def default_sampler(distilled: dict | None, fallback: str = DEFAULT_SAMPLER) -> str:
    """The sampler when none is named: a student's own (it was trained for exactly that chain), else `fallback`
    (DEFAULT_SAMPLER for the CLI and the server, API_DEFAULT_SAMPLER for the Python API)."""
    return student_sampler(distilled) or fallback


def off_grid_warning(sampler: str, distilled: dict | None) -> str | None:
    """One line when a student is sampled with another sampler than the one it was made for."""
    own = student_sampler(distilled)
    if own is None or sampler == own:
        return None
    if own == LCM:
        return (f"warning: this model was consistency-tuned for --sampler lcm ({distilled['steps']} steps on "
                f"timesteps {list(distilled['timesteps'])}); --sampler {sampler} samples it as an ordinary diffusion "
                "model (leave --sampler out to use lcm)")
    return (f"warning: this model was distilled for {distilled['steps']}-step DDIM on timesteps "
            f"{list(distilled['timesteps'])}; --sampler {sampler} samples it off that grid (leave --sampler out "
            "to use it)")


@dataclass(frozen=True)
class SamplerSpec:
    """The sampler and its options; None means the default (sampler: the caller's, see `with_default`; steps:
    T for ddpm, DEFAULT_STEPS otherwise; order 2; variant bh2; spacing DEFAULT_SPACING). Built = checked: a bad
    value raises UserError with the one line for its rule. Frozen and hashable, so it keys plan caches."""

    sampler: str | None = None
    steps: int | None = None
    eta: float = 0.0
    order: int | None = None
    variant: str | None = None
    spacing: str | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen: normalise once, here)
        set_("steps", _integer(self.steps, "steps"))
        set_("order", _integer(self.order, "order"))
        set_("eta", _eta(self.eta))
        if self.sampler is None and any(v is not None for v in (self.order, self.variant, self.spacing)):
            set_("sampler", DEFAULT_SAMPLER)  # options only multistep samplers have name the default one
        self.validate()

    def validate(self) -> None:
        """Every rule that needs no model, in a fixed order, each one line saying what applies."""
        s = self.sampler
        if s is not None and (not isinstance(s, str) or s not in SAMPLERS):
            raise UserError(f"unknown sampler {s!r}: choose one of {', '.join(SAMPLERS)}")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"steps must be between 1 and T (the model's timesteps), got {self.steps}")
        if self.eta != 0.0 and s != "ddim":
            # refused rather than ignored: whoever sets eta expects it to change the images, and here it cannot
            raise UserError(f"eta applies to sampler ddim only ({s or 'the default sampler'} has no eta): drop eta "
                            "or use sampler ddim")
        self._check_order()
        self._check_variant()
        self._check_spacing()

    def _check_order(self) -> None:
        if self.order is None:
            return
        if self.sampler not in ORDERS:
            raise UserError(f"sampler {self.sampler} has no order: drop order (it applies to {', '.join(ORDERS)})")
        allowed = ORDERS[self.sampler]
        if self.order not in allowed:
            raise UserError(f"order for {self.sampler} must be between {allowed[0]} and {allowed[-1]}, got "
                            f"{self.order}")

    def _check_variant(self) -> None:
        if self.variant is None:
            return
        if not isinstance(self.variant, str) or self.variant not in UNIPC_VARIANTS:
            raise UserError(f"unknown unipc variant {self.variant!r}: choose one of {', '.join(UNIPC_VARIANTS)}")
        if self.sampler != "unipc":
            raise UserError(f"sampler {self.sampler} has no variant: drop variant (it applies to unipc)")

    def _check_spacing(self) -> None:
        if self.spacing is None:
            return
        if not isinstance(self.spacing, str) or self.spacing not in SPACINGS:
            raise UserError(f"unknown timestep spacing {self.spacing!r}: choose one of {', '.join(SPACINGS)}")
        if self.sampler == DISTILLED:
            raise UserError("sampler distilled runs on the grid the model was distilled for: drop spacing")
        if self.sampler == LCM:
            raise UserError("sampler lcm runs on LCMScheduler's own grid (evenly picked from its 50 original "
                            "steps): drop spacing")
        if self.sampler in ("ddpm", "ddim") and self.spacing != "leading":
            raise UserError(f"sampler {self.sampler} uses 'leading' timestep spacing only (like diffusers' "
                            "default); spacing applies to dpmpp, dpmpp_sde and unipc")

    def with_default(self, sampler: str) -> "SamplerSpec":
        """This spec, with `sampler` when none was named (checked again: the options must suit it)."""
        return self if self.sampler is not None else dataclasses.replace(self, sampler=sampler)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def as_spec(spec: SamplerSpec | None = None, **fields) -> SamplerSpec:
    """`spec`, or a SamplerSpec from the separate keyword arguments (sampler=, steps=, ...: the API before
    SamplerSpec, kept), not both."""
    defaults = {f.name: f.default for f in dataclasses.fields(SamplerSpec)}
    given = {k: v for k, v in fields.items() if v is not None and not (k in defaults and v == defaults[k])}
    unknown = set(fields) - set(FIELDS)
    assert not unknown, unknown
    if spec is None:
        return SamplerSpec(**given)
    if not isinstance(spec, SamplerSpec):
        raise UserError(f"spec must be a SamplerSpec, got {type(spec).__name__}")
    if given:
        raise UserError(f"give spec= or {', '.join(sorted(given))}=, not both")
    return spec


def _integer(v, name: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise UserError(f"{name} must be an integer, got {v!r}")
    return int(v)


def _eta(v) -> float:
    lo, hi = ETA_RANGE
    ok = not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v) and lo <= v <= hi
    if not ok:
        raise UserError(f"eta must be a finite number between {lo:g} and {hi:g} (DDIM: 0 deterministic, 1 DDPM's "
                        f"variance), got {v!r}")
    return float(v)
