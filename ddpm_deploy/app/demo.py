"""`ddpm-deploy demo`: the shipped digits model through every stage, printing what each wrote."""
# The stages' modules are imported in run_demo: the CLI imports this module for every command (`--help` included),
# which loads neither numpy nor the runtime.

from __future__ import annotations

import time
from pathlib import Path

from ..errors import UserError
from ..extras import require_torch_extra
from ..files import check_writable_dir, write_bytes_atomic


def _stage(echo, name: str):
    echo(f"\n== {name}")
    return time.perf_counter()


# The default chain: DDIM 50 is deterministic, so its whole-chain verdict (engine vs PyTorch from the same x_T)
# is the strict test of the export, and it keeps the demo near a minute on 2 cores; --full runs DDPM over all T.
DEMO_SAMPLING = {"sampler": "ddim", "steps": 50}
VERIFY_N = 8  # images per whole-chain verify


def run_demo(out: str, n: int = 16, full: bool = False, echo=print, model: str = "digits",
             progress: bool = False) -> bool:
    from ..export import onnx_from_checkpoint
    from ..images import save_grid
    from ..nn import resolve_checkpoint_path
    from .opener import open_reference
    from ..runtime import engine_from_onnx, load
    from .verify import report_json, save_plot, summary_lines, verify_chain

    require_torch_extra("demo")  # before the output folder exists: a plain install leaves nothing behind
    out_dir = check_writable_dir(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    sampling = {"sampler": "ddpm"} if full else DEMO_SAMPLING
    stem = Path(model).stem  # file names: "digits", or a checkpoint's stem
    echo(f"ddpm-deploy demo: model {model!r} ({resolve_checkpoint_path(model)}), writing to {out_dir}/")
    onnx_paths = {}
    for dtype in ("fp32", "fp16"):
        t0 = _stage(echo, f"export {dtype}")
        path = out_dir / f"{stem}{'.fp16' if dtype == 'fp16' else ''}.onnx"
        onnx_from_checkpoint(model, path, fp16=dtype == "fp16", max_batch=max(n, 1), echo=echo, progress=progress)
        onnx_paths[dtype] = path
        echo(f"wrote {path} ({time.perf_counter() - t0:.1f}s)")
    t0 = _stage(echo, "build TensorRT engine")
    try:
        r = engine_from_onnx(onnx_paths["fp16"], out_dir / f"{stem}.fp16.trt", echo=echo)
        echo(f"wrote {r['path']} ({time.perf_counter() - t0:.1f}s)")
    except UserError as e:
        echo(f"skipped: {e}")
    ok = True
    for dtype, path in onnx_paths.items():
        t0 = _stage(echo, f"run {dtype} ({sampling['sampler']}, {n} images)")
        with load(str(path), backend="onnxruntime") as pipe:
            images = pipe.sample(n, seed=0, progress=progress, **sampling)
            timing = pipe.last_timing
        grid_path = save_grid(images, out_dir / f"samples_{dtype}.png")
        echo(f"wrote {grid_path} ({timing['seconds']:.1f}s, {1000 * timing['seconds'] / timing['steps']:.2f} ms/step)")
        t0 = _stage(echo, f"verify {dtype} against PyTorch")
        with load(str(path), backend="onnxruntime") as dep, open_reference(model) as ref:
            report = verify_chain(dep, ref, n=min(n, VERIFY_N), seed=0, progress=progress, **sampling)
        write_bytes_atomic(report_json(report).encode(), out_dir / f"verify_{dtype}.json")
        save_plot(report, out_dir / f"verify_{dtype}.png")
        for line in summary_lines(report):
            echo(line)
        echo(f"wrote {out_dir / f'verify_{dtype}.json'} and .png ({time.perf_counter() - t0:.1f}s)")
        ok = ok and report["verdict"] == "pass"
    echo(f"\ndemo {'passed' if ok else 'FAILED'}: see {out_dir}/")
    return ok
