"""Exported eps ONNX -> TensorRT engine of the fused reverse step, with a manifest sidecar `<engine>.json`.

Written against the TensorRT 10 and 11 Python API:
- strongly typed network: precision comes from the ONNX (an fp16 one from `ddpm-deploy export --fp16`), never
  from BuilderFlag.FP16/BF16 (deprecated in 10.12, removed in 11). STRONGLY_TYPED is set by symbolic name when
  the enum has it: required for that in 10.x, accepted and ignored in 11 (where its value changed from 1 to 0).
- TF32 is cleared where the flag exists, so an fp32 ONNX gives an fp32 engine (the verify tolerances assume it).
- one optimization profile over batch 1..max for every input (ddpm_deploy.fused_io: x_t, t, z, coefs, hist).
- a timing cache read from and written back to a file, so rebuilds skip tactic timing.
Nothing is written, and TensorRT is not even imported, unless TensorRT and a CUDA GPU are there.
"""

from __future__ import annotations

import time
from pathlib import Path

from ...errors import UserError, first_line
from ...files import check_output_path, sha256_bytes, write_bytes_atomic
from ...graph.fused import fused_manifest, fused_model
from ...artifact.fields import ENGINE_SUFFIXES
from ...artifact.manifest import Manifest, load_onnx, sidecar_path
from ...fused_io import input_shapes
from ..cuda import import_tensorrt, require_gpu, tensorrt_problem
from .tensorrt_backend import trt_logger

def default_engine_path(onnx_path: str | Path) -> Path:
    return Path(onnx_path).with_suffix(".trt")


def batch_profile(manifest: Manifest, max_batch: int | None, opt_batch: int | None) -> dict:
    """{"min", "opt", "max"} within what the ONNX was exported and checked for."""
    onnx_max = manifest.max_batch
    mx = onnx_max if max_batch is None else int(max_batch)
    if not 1 <= mx <= onnx_max:
        raise UserError(f"--max-batch must be between 1 and {onnx_max} (the ONNX's batch range); got {mx}: "
                        f"re-export with `ddpm-deploy export CHECKPOINT --max-batch {mx}` for more")
    opt = mx if opt_batch is None else int(opt_batch)
    if not 1 <= opt <= mx:
        raise UserError(f"--opt-batch must be between 1 and the max batch {mx}, got {opt}")
    return {"min": 1, "opt": opt, "max": mx}


def engine_manifest(onnx_manifest: Manifest, *, trt_version: str, gpu_name: str, compute_capability: str,
                    onnx_sha256: str, engine_sha256: str, batch: dict, tf32: bool = False) -> Manifest:
    """The sidecar: the ONNX's manifest with the engine's IO and fused-step interface version, batch profile, and
    what the engine is tied to."""
    return fused_manifest(onnx_manifest).replace(
        tensorrt={"version": str(trt_version), "gpu_name": str(gpu_name), "compute_capability": str(compute_capability),
                  "hardware_compatible": False, "tf32": bool(tf32)},
        onnx_sha256=onnx_sha256, engine_sha256=engine_sha256,
        min_batch=int(batch["min"]), opt_batch=int(batch["opt"]), max_batch=int(batch["max"]))


def publish_engine(engine: bytes, path: str | Path, manifest: Manifest) -> Path:
    """Write engine and sidecar atomically. The old sidecar goes first: a crash in between leaves an engine with no
    sidecar (refused on load), never a new engine described by an old sidecar."""
    path, side = Path(path), sidecar_path(path)
    side.unlink(missing_ok=True)
    write_bytes_atomic(engine, path)
    write_bytes_atomic(manifest.to_json().encode(), side)
    return side


def _check_paths(onnx_path: Path, out: Path, timing: Path) -> None:
    if out.suffix not in ENGINE_SUFFIXES:
        raise UserError(f"engine path {out} must end in {', '.join(ENGINE_SUFFIXES)} (so `load` recognises it)")
    for p in (out, timing):
        check_output_path(p)
    if not onnx_path.is_file():
        raise UserError(f"{onnx_path} not found: export one with `ddpm-deploy export CHECKPOINT -o {onnx_path}`")


def engine_from_onnx(onnx_path: str | Path, out: str | Path | None = None, *, max_batch: int | None = None,
                     opt_batch: int | None = None, timing_cache: str | Path | None = None, workspace_mb: int = 2048,
                     echo=print) -> dict:
    """Build `out` (default MODEL.trt) from MODEL.onnx; returns {"path", "manifest_path", "seconds", "manifest"}."""
    t0 = time.time()
    problem = tensorrt_problem()  # environment first: nothing below may create a file or import tensorrt
    if problem:
        raise UserError(problem)
    gpu = require_gpu()
    onnx_path = Path(onnx_path)
    out = Path(out) if out else default_engine_path(onnx_path)
    timing = Path(timing_cache) if timing_cache else Path(str(out) + ".timing")
    _check_paths(onnx_path, out, timing)
    if workspace_mb <= 0:
        raise UserError(f"--workspace must be a positive number of MB, got {workspace_mb}")
    onnx_manifest = load_onnx(onnx_path)[1]
    batch = batch_profile(onnx_manifest, max_batch, opt_batch)
    trt = import_tensorrt()
    echo(f"building a TensorRT {trt.__version__} engine for {gpu['name']} (compute capability "
         f"{gpu['compute_capability']}) from {onnx_path} ({onnx_manifest.dtype}, fused step, batch "
         f"{batch['min']}..{batch['max']}, opt {batch['opt']})")
    fused = fused_model(onnx_path, onnx_manifest).SerializeToString()
    cache_in = timing.read_bytes() if timing.is_file() else b""
    engine, cache_out = _build(trt, fused, onnx_manifest, batch, cache_in, workspace_mb, echo)
    manifest = engine_manifest(onnx_manifest, trt_version=trt.__version__, gpu_name=gpu["name"],
                               compute_capability=gpu["compute_capability"],
                               onnx_sha256=sha256_bytes(onnx_path.read_bytes()), engine_sha256=sha256_bytes(engine),
                               batch=batch)
    side = publish_engine(engine, out, manifest)
    if cache_out:
        write_bytes_atomic(cache_out, timing)
        echo(f"  timing cache {timing} ({'updated' if cache_in else 'created'}, {len(cache_out)} bytes)")
    return {"path": str(out), "manifest_path": str(side), "seconds": time.time() - t0, "manifest": manifest}


def _network_flags(trt) -> int:
    # create_network takes a bit set; each enum value is a bit position, looked up by name (10.x: 1, 11: 0 and
    # ignored). A TensorRT without the member gets no flags.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _build(trt, fused_onnx: bytes, manifest: Manifest, batch: dict, cache_in: bytes, workspace_mb: int, echo):
    """(serialized engine bytes, serialized timing cache bytes) or a UserError with TensorRT's own message."""
    logger = trt_logger(trt)
    try:
        builder = trt.Builder(logger)
    except Exception as e:  # CUDA could not be initialised after all (driver/runtime mismatch)
        detail = "; ".join(logger.errors[-2:]) or first_line(e)
        raise UserError(f"TensorRT could not start on the GPU ({detail}): check the driver with `nvidia-smi` and "
                        "that the tensorrt wheel matches its CUDA version") from None
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(fused_onnx):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UserError(f"TensorRT's ONNX parser rejected the fused graph: {'; '.join(errors)[:400] or 'no detail'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None:
        config.clear_flag(tf32)
    config.add_optimization_profile(_profile(builder, manifest, batch))
    cache = _timing_cache(config, cache_in, echo)
    # only what the build itself logs: a foreign timing cache logs an error above that is already handled
    del logger.errors[:]
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = "; ".join(logger.errors[-3:])[:400] or "no detail from TensorRT"
        raise UserError(f"TensorRT could not build the engine: {detail}; no file written (check the workspace "
                        "limit with --workspace, and that the ONNX was exported by this ddpm-deploy)")
    cache_bytes = bytes(memoryview(cache.serialize())) if cache is not None else b""
    return bytes(memoryview(serialized)), cache_bytes


def _profile(builder, manifest: Manifest, batch: dict):
    profile = builder.create_optimization_profile()
    lo, opt, hi = (input_shapes(manifest, batch[k]) for k in ("min", "opt", "max"))
    for name in lo:
        profile.set_shape(name, lo[name], opt[name], hi[name])
    return profile


def _timing_cache(config, cache_in: bytes, echo):
    """Attach a timing cache seeded from `cache_in`; one from another TensorRT version or GPU starts afresh."""
    cache = config.create_timing_cache(cache_in)
    if cache is not None and config.set_timing_cache(cache, False):
        return cache
    if cache_in:
        echo("  timing cache does not match this TensorRT/GPU: starting a new one")
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, False):
        return None
    return cache
