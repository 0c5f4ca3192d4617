"""The sides compared: our runtime (any backend, through `pipelines.open_pipeline`), the PyTorch reference, and
diffusers' own DDPMPipeline / DDIMPipeline on the same weights, steps and batch. Local imports: torch and diffusers
(the torch extra), only for the checkpoint's sides."""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import backend_registry as registry
from ..errors import UserError, first_line
from ..artifact.manifest import Manifest, kind_of
from ..nn import load_checkpoint
from ..app.opener import REFERENCE, open_pipeline
from ..sampling.spec import DEFAULT_ORDER, DEFAULT_SPACING, SamplerSpec
from ..app.verify import check_same_model
from .spec import BenchSpec
from .timing import ModuleTimer, measure, summarize

SHORT_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def open_runtime(path: str, backend: str | None, device: str, precision: str | None, threads: int | None):
    """A Pipeline through `open_pipeline`; `threads` goes to the registry's CPU-threaded backends on the CPU (auto
    picks its own), `precision` to the backends that take one (OpenVINO)."""
    name = backend or registry.default_backend(kind_of(path), device)
    threads = threads if registry.cpu_threaded(name) and device == "cpu" else None
    try:
        return open_pipeline(path, device=device, backend=name, precision=precision, threads=threads)
    except (ImportError, TypeError) as e:  # a backend missing from this install, or an option it does not take
        raise UserError(f"cannot open {path} on backend {name}: {first_line(e)}") from None


def dtype_label(pipe) -> str:
    """fp32 / fp16 from the file, bf16 when OpenVINO runs it in bf16."""
    precision = getattr(pipe.backend, "precision", None)
    if precision and precision != "fp32":
        return precision
    return SHORT_DTYPES.get(pipe.manifest.dtype, pipe.manifest.dtype)


def bench_pipeline(pipe, spec: BenchSpec, tick=None) -> list[dict]:
    """Time `pipe` (a runtime Pipeline) at each of the spec's batch sizes, reading the backend's engine counter;
    `tick()` after each batch size (progress)."""
    too_big = [b for b in spec.batches if b > pipe.backend.max_batch]
    if too_big:
        raise UserError(f"batch {too_big[0]} is over this engine's maximum {pipe.backend.max_batch}: re-export "
                        f"with --max-batch {max(spec.batches)} or choose --batch up to {pipe.backend.max_batch}")
    pipe.plan(spec=spec.sampling)  # steps > T fails here, before anything runs
    warm = dataclasses.replace(spec.sampling, steps=min(spec.warmup, pipe.schedule.T)) if spec.warmup else None
    rows = []
    for b in spec.batches:
        def chain(seed, sampling=spec.sampling, b=b):
            pipe.sample(b, seed=seed, spec=sampling, batch_size=b)

        if warm:
            chain(0, warm)
        calls = pipe.backend.engine_time.record()
        try:
            rows.append(summarize(measure(chain, calls, spec.repeats), b, spec.steps))
        finally:
            pipe.backend.engine_time.stop()
        if tick:
            tick()
    return rows


def runtime_rows(spec: BenchSpec, engine: str, backend: str | None, precision: str | None, echo,
                 tick=None) -> list[dict]:
    """One engine on one backend: a row per batch size (and, on auto, the table it chose from under "auto")."""
    with open_runtime(engine, backend, spec.device, precision, spec.threads) as pipe:
        if spec.checkpoint is not None:
            check_against_checkpoint(pipe.manifest, spec.checkpoint)
        choice = getattr(pipe, "backend_choice", None)
        base = {"model": spec.model, "sampler": spec.sampler, "sampling": spec.sampling.to_dict(),
                "device": spec.device, "engine": engine,
                "backend": pipe.backend.name, "dtype": dtype_label(pipe), "precision": precision,
                "threads": choice.threads if choice else spec.threads,
                "runtime_backend": "auto" if choice else (backend or pipe.backend.name.split("-")[0])}
        if choice:
            base["auto"] = choice.to_dict()
        rows = [{**base, **r} for r in bench_pipeline(pipe, spec, tick)]
    for r in rows:
        echo(line(r))
    return rows


def check_against_checkpoint(manifest, checkpoint: str) -> None:
    """A comparison is only fair on the same weights: the engine must come from this checkpoint."""
    ckpt = load_checkpoint(checkpoint)
    check_same_model(manifest, Manifest.from_checkpoint(ckpt, max_batch=manifest.max_batch))


def checkpoint_rows(spec: BenchSpec, echo, tick=None) -> list[dict]:
    """The PyTorch reference through our runtime (unless spec.torch_reference is False), then diffusers' own
    pipeline, on the checkpoint's weights, both on `spec.reference_threads`."""
    import torch

    torch.set_num_threads(spec.reference_threads)
    common = {"model": spec.model, "sampler": spec.sampler, "sampling": spec.sampling.to_dict(),
              "engine": spec.checkpoint, "dtype": "fp32", "precision": None, "threads": spec.reference_threads}
    rows = []
    if spec.torch_reference:
        with open_runtime(spec.checkpoint, REFERENCE, "cpu", None, spec.reference_threads) as pipe:
            base = {**common, "device": spec.device, "backend": pipe.backend.name, "runtime_backend": REFERENCE}
            rows += [{**base, **r} for r in bench_pipeline(pipe, spec, tick)]
    pipe = diffusers_pipeline(spec.checkpoint, spec.sampling)
    base = {**common, "device": "cpu", "backend": f"diffusers-{type(pipe).__name__}", "runtime_backend": "diffusers"}
    rows += [{**base, **r} for r in bench_diffusers(pipe, spec, tick)]
    for r in rows:
        echo(line(r))
    return rows


def diffusers_pipeline(checkpoint: str, sampler: str | SamplerSpec):
    """diffusers' DDPMPipeline (or DDIMPipeline) on the checkpoint's weights and exact betas; for the multistep
    samplers DDPMPipeline's loop driving DPMSolverMultistepScheduler / UniPCMultistepScheduler with the spec's order,
    variant and spacing (None: the same defaults as ours and theirs). DDIM's eta goes to the call (bench_diffusers)."""
    sampling = sampler if isinstance(sampler, SamplerSpec) else SamplerSpec(sampler)
    sampler = sampling.sampler
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    ckpt = load_checkpoint(checkpoint)
    common = {"num_train_timesteps": ckpt.schedule.T, "trained_betas": np.asarray(ckpt.schedule.betas),
              "clip_sample": ckpt.clip_sample, "clip_sample_range": ckpt.clip_sample_range,
              "prediction_type": ckpt.prediction_type}
    if sampler == "ddpm":
        pipe = DDPMPipeline(ckpt.build_unet(), DDPMScheduler(variance_type=ckpt.variance_type, **common))
    elif sampler == "lcm":
        from diffusers import LCMScheduler

        pipe = DDPMPipeline(ckpt.build_unet(), LCMScheduler(**common))
    elif sampler != "ddim":
        pipe = DDPMPipeline(ckpt.build_unet(), _diffusers_multistep(sampling, common))
    else:
        pipe = DDIMPipeline(ckpt.build_unet(), DDIMScheduler(**common))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_multistep(sampling: SamplerSpec, common: dict):
    """DPMSolverMultistepScheduler / UniPCMultistepScheduler on our betas, with the spec's order and spacing."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    sampler = sampling.sampler
    kw = {k: v for k, v in common.items() if not k.startswith("clip_sample")}  # these have no clip_sample
    kw.update(solver_order=sampling.order or DEFAULT_ORDER,
              timestep_spacing=sampling.spacing or DEFAULT_SPACING[sampler])
    if sampler == "unipc":
        class UniPC(UniPCMultistepScheduler):  # DDPMPipeline passes generator=, which UniPC's step does not take
            def step(self, model_output, timestep, sample, generator=None, return_dict=True):
                return super().step(model_output, timestep, sample, return_dict=return_dict)

        return UniPC(solver_type=sampling.variant or "bh2", **kw)
    return DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++" if sampler == "dpmpp_sde" else "dpmsolver++",
                                       **kw)


def bench_diffusers(pipe, spec: BenchSpec, tick=None) -> list[dict]:
    """Time diffusers' pipeline end to end (noise, UNet, scheduler, numpy output) at each batch size."""
    import torch

    T = pipe.scheduler.config.num_train_timesteps
    eta = {"eta": spec.sampling.eta} if spec.sampler == "ddim" else {}  # DDIMPipeline's own eta argument
    if not 1 <= spec.steps <= T:
        raise UserError(f"steps must be between 1 and T={T}, got {spec.steps}")  # the text of samplers.make_plan
    rows = []
    for b in spec.batches:
        def chain(seed, k=spec.steps, b=b):
            pipe(batch_size=b, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=k,
                 output_type="np", **eta)

        with torch.inference_mode():
            if spec.warmup:
                chain(0, min(spec.warmup, T))
            with ModuleTimer(pipe.unet) as timer:
                rows.append(summarize(measure(chain, timer.calls, spec.repeats), b, spec.steps))
        if tick:
            tick()
    return rows


def line(r: dict) -> str:
    """One configuration, as printed while the benchmark runs."""
    return (f"  {r['backend']:>24s} {r['dtype']:>4s} {r['threads']}t batch {r['batch']:3d}: "
            f"{r['ms_per_step']:9.2f} ms/step (engine {r['engine_ms']:8.2f} ms)  {r['images_per_s']:8.2f} img/s "
            f"@ {r['steps']} steps  overhead {100 * r['overhead']:5.2f}%"
            + ("" if r.get("spread") is None else f"  spread {100 * r['spread']:.0f}%{' NOISY' * bool(r['noisy'])}"))
