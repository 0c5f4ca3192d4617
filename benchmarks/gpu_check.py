"""The GPU device loop, checked on a real GPU without TensorRT, in a few minutes.

    python benchmarks/gpu_check.py              # needs torch (CUDA build), cupy, cuda-bindings; no TensorRT, no network

What runs for real: `runtime.backends.tensorrt_backend.TensorRTBackend` and `ddpm_deploy.loop.run.run_chain`
on cuda-bindings: device buffers, the stream, the step tables, noise windows, the device-to-device copies and the
captured CUDA graph. Only TensorRT is replaced: by the stand-in `tensorrt` module the CPU emulation tests use too
(tests/fake_tensorrt.py; it is installed even where a real TensorRT is, and only in this process), whose enqueueV3
launches a CUDA kernel of the fused step (cupy RawKernel, on the backend's stream and so captured into its graph;
it writes the `nonfinite` output too, so the loop's finiteness flags run for real), with a fixed
stand-in eps_theta(x_t, t) = 0.5 x_t (1 - t / T). Why not a UNet inside the captured graph: this is a check of
the pointer and stream plumbing, and an elementwise eps makes the numpy reference exact to float rounding, so a
wrong pointer, stale table row or missing copy shows up as a large error instead of hiding in network noise;
the network's speed is measured separately below, with torch's own CUDA graphs.

Checks (exit 1 if one fails): x_0 of the device loop (CUDA graph and plain enqueue) against the numpy host loop
for DDPM (1000 steps) and DDIM (50 steps, eta 1) at batch 1 and 8, with 4-step noise windows as well; graphs were
captured and replayed every step. Timings: device loop ms/step (graph, enqueue); the torch CUDA reference UNet
(preset "cifar10", random weights) per eps call at batch 8: fp32 (TF32 off), fp16, and both replayed as CUDA
graphs. Without a GPU it prints one line ("no GPU") and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import OUT, write_outputs
from ddpm_deploy.bench.timing import median_ms

T = 1000
SHAPE = (3, 32, 32)
BATCHES = (1, 8)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
    p.add_argument("--out", type=Path, default=OUT, help="writes OUT/gpu_check.json and .md")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- stand-in engine

def kernel_source() -> str:
    """The fused step (ddpm_deploy.fused_io's interface) for one element, coefficient columns by name."""
    from ddpm_deploy.fused_io import COL, N_COEFS, N_HIST

    c = {name: f"r[{i}]" for name, i in COL.items()}
    return f"""
extern "C" __global__ void fused_step(unsigned long long x_p, unsigned long long t_p, unsigned long long z_p,
    unsigned long long coefs_p, unsigned long long hist_p, unsigned long long eps_p, unsigned long long xprev_p,
    unsigned long long hout_p, unsigned long long bad_p, int n, int total, float T) {{
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const float* x = (const float*)x_p; const float* t = (const float*)t_p; const float* z = (const float*)z_p;
  const float* hist = (const float*)hist_p; float* hout = (float*)hout_p;
  int b = i / n, j = i - b * n;
  const float* r = (const float*)coefs_p + {N_COEFS} * b;
  long hb = (long)b * {N_HIST} * n + j;
  float xt = x[i];
  float e = 0.5f * xt * (1.0f - t[b] / T);                       // stand-in eps_theta
  ((float*)eps_p)[i] = e;
  float m_raw = {c['a_x']} * xt - {c['a_e']} * e;
  float m = fminf(fmaxf(m_raw, -{c['clip']}), {c['clip']});
  float h0 = hist[hb], h1 = hist[hb + n], h2 = hist[hb + 2 * n], h3 = hist[hb + 3 * n];
  float xc = {c['u_x']} * xt + {c['u_l']} * h0 + {c['u_0']} * m + {c['u_1']} * h1 + {c['u_2']} * h2 + {c['u_3']} * h3;
  float xp = {c['p_c']} * xc + {c['p_0']} * m + {c['p_1']} * h1 + {c['p_2']} * h2 + {c['c_e']} * e + {c['s_min']} * z[i];
  ((float*)xprev_p)[i] = xp;
  hout[hb] = xc; hout[hb + n] = m; hout[hb + 2 * n] = h1; hout[hb + 3 * n] = h2;
  if (!isfinite(e) || !isfinite(m_raw) || !isfinite(xp)) ((float*)bad_p)[b] = 1.0f;  // `nonfinite`, zeroed before
}}
"""


class KernelEngine:
    """tests/fake_tensorrt.py's engine for the stand-in: IO from ddpm_deploy.fused_io at SHAPE, and an enqueue that
    zeroes `nonfinite` and launches the fused-step kernel at the bound addresses on the backend's stream."""

    def __init__(self, kernel):
        from ddpm_deploy.fused_io import INPUTS, OUTPUTS

        size = {"B": -1, "C": SHAPE[0], "H": SHAPE[1], "W": SHAPE[2], "C_out": SHAPE[0]}
        self.inputs, self.outputs = ({n: tuple(size.get(d, d) for d in dims) for n, dims in table.items()}
                                     for table in (INPUTS, OUTPUTS))
        self.kernel = kernel

    def enqueue(self, stream, addrs, shapes, context):
        import cupy

        b, *chw = shapes["x_t"]
        n = int(np.prod(chw))
        args = tuple(np.uint64(addrs[k]) for k in ("x_t", "t", "z", "coefs", "hist", "eps", "x_prev", "hist_out",
                                                   "nonfinite"))
        cupy.cuda.runtime.memsetAsync(addrs["nonfinite"], 0, 4 * b, int(stream))
        with cupy.cuda.ExternalStream(int(stream)):
            self.kernel(((b * n + 255) // 256,), (256,), args + (np.int32(n), np.int32(b * n), np.float32(T)))


def stand_in_tensorrt(version: str):
    """The shared stand-in `tensorrt` module (tests/fake_tensorrt.py) whose enqueueV3 launches the kernel."""
    import cupy

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from fake_tensorrt import fake_tensorrt

    kernel = cupy.RawKernel(kernel_source(), "fused_step")
    return fake_tensorrt(version, lambda data: KernelEngine(kernel), max(BATCHES))


def write_engine(folder: Path, gpu: dict, version: str) -> str:
    from ddpm_deploy.files import sha256_bytes
    from ddpm_deploy.graph.fused import fused_manifest
    from ddpm_deploy.artifact.manifest import Manifest
    from ddpm_deploy.runtime.backends.tensorrt_build import publish_engine
    from ddpm_deploy.sampling.schedule import Schedule

    data = b"stand-in engine: the fused step as a CUDA kernel"
    m = Manifest(channels=SHAPE[0], height=SHAPE[1], width=SHAPE[2], out_channels=SHAPE[0],
                 schedule=Schedule.build("linear", T), max_batch=max(BATCHES), opt_batch=max(BATCHES),
                 engine_sha256=sha256_bytes(data),
                 tensorrt={"version": version, "gpu_name": gpu["name"], "compute_capability": gpu["compute_capability"],
                           "hardware_compatible": False, "tf32": False})
    path = folder / "standin.trt"
    publish_engine(data, path, fused_manifest(m))
    return str(path)


def host_fixed_eps(manifest):
    """The numpy host loop (ddpm_deploy.loop.host.HostSteps) with the same stand-in eps."""
    from ddpm_deploy.loop.run import Backend
    from ddpm_deploy.loop.host import HostSteps
    from ddpm_deploy.sampling.noise import WINDOW_BYTES

    def net(x_t, t):
        scale = np.float32(1) - t.astype(np.float32)[:, None, None, None] / np.float32(T)
        return (np.float32(0.5) * x_t * scale).astype(np.float32)

    be = Backend()
    be.name, be.manifest, be.max_batch = "numpy-standin", manifest, max(BATCHES)
    be.steps = HostSteps(net, manifest.image_shape, be.max_batch, be.name, WINDOW_BYTES)
    return be


# ---------------------------------------------------------------------------------------------- parts

def device_loop_rows(engine: str, reps: int) -> list:
    from ddpm_deploy.sampling.noise import ChunkNoise
    from ddpm_deploy.runtime import load
    from ddpm_deploy.sampling.plan import make_plan
    from ddpm_deploy.tolerances import GPU_CHECK_X0_ATOL

    rows = []
    for graph in (True, False):
        with load(engine, cuda_graph=graph) as pipe:
            be = pipe.backend
            host = host_fixed_eps(be.manifest)
            for sampler, steps, eta in (("ddpm", None, 0.0), ("ddim", 50, 1.0)):
                plan = make_plan(be.manifest.schedule, sampler, steps, eta)
                for b in BATCHES:
                    noise = lambda: ChunkNoise(SHAPE, 0, b, seed=b)  # noqa: E731
                    want = host.run_chain(noise(), plan)
                    launches = be.graph_launches
                    got = be.run_chain(noise(), plan)
                    replayed = be.graph_launches - launches
                    be.noise_window_bytes = 4 * want.nbytes  # 4-step noise windows
                    windows = be.run_chain(noise(), plan)
                    be.noise_window_bytes = 512 << 20
                    err = float(max(np.abs(got - want).max(), np.abs(windows - want).max()))
                    ok = err <= GPU_CHECK_X0_ATOL and (replayed == plan.steps if graph else replayed == 0)
                    ms = median_ms(lambda: be.run_chain(noise(), plan), 1, reps)
                    rows.append({"what": f"device loop {'CUDA graph' if graph else 'enqueue'}", "sampler": sampler,
                                 "steps": plan.steps, "batch": b, "x0_max_abs_err": err, "graph_replays": replayed,
                                 "graphs_captured": be._cuda.graphs_captured, "ms_per_step": ms / plan.steps,
                                 "ok": bool(ok)})
    return rows


def torch_rows(reps: int, batch: int = 8) -> list:
    """The torch CUDA reference UNet ("cifar10" preset, random weights): ms per eps call."""
    import torch

    from ddpm_deploy.config import unet_config
    from ddpm_deploy.nn.unet import unet_from_config

    torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 reference, not TF32
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.float16):
        net = unet_from_config(unet_config("cifar10", sample_size=SHAPE[1], channels=SHAPE[0])).cuda().to(dtype).eval()
        x = torch.randn(batch, *SHAPE, device="cuda", dtype=dtype)
        t = torch.full((batch,), 500.0, device="cuda")
        with torch.no_grad():
            def eager():
                net(x, t).sample
                torch.cuda.synchronize()

            for _ in range(3):
                eager()
            rows.append({"what": f"torch eager {str(dtype)[6:]}", "batch": batch,
                         "ms_per_eps": median_ms(eager, 1, reps)})
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up on a side stream, as torch's CUDA graph docs ask
                for _ in range(3):
                    net(x, t)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = net(x, t).sample
            graph.replay()
            torch.cuda.synchronize()
            same = float((out - net(x, t).sample).abs().max())

            def replay():
                graph.replay()
                torch.cuda.synchronize()

            rows.append({"what": f"torch CUDA graph {str(dtype)[6:]}", "batch": batch,
                         "ms_per_eps": median_ms(replay, 1, reps), "graph_vs_eager_max_abs": same})
        del net
    return rows


def markdown(rows: list) -> str:
    lines = ["| what | sampler | steps | batch | ms/step or ms/eps | max abs err x_0 | ok |", "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        ms = r.get("ms_per_step", r.get("ms_per_eps"))
        err = r.get("x0_max_abs_err")
        lines.append(f"| {r['what']} | {r.get('sampler', '–')} | {r.get('steps', '–')} | {r['batch']} | {ms:.3f} | "
                     f"{'–' if err is None else format(err, '.1e')} | {r.get('ok', '–')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ddpm_deploy.errors import UserError
    from ddpm_deploy.runtime.cuda import require_gpu

    try:
        gpu = require_gpu()
    except UserError as e:
        print(f"gpu_check: no GPU, nothing to check ({e})")
        return 0
    try:
        import cupy  # noqa: F401
        from cuda.bindings import runtime  # noqa: F401
    except ImportError as e:
        print(f"gpu_check: needs cupy and cuda-bindings ({e}): pip install cupy-cuda12x 'cuda-bindings>=12.6,<13' "
              "(or the cuda13x / 13.x pair matching the driver)")
        return 2
    version = "stand-in"
    sys.modules["tensorrt"] = stand_in_tensorrt(version)  # enqueueV3 only; everything else is the real code
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        rows = device_loop_rows(write_engine(Path(tmp), gpu, version), args.reps)
    rows += torch_rows(args.reps)
    report = {"gpu": gpu, "seconds": round(time.time() - t0, 1), "rows": rows}
    write_outputs(report, args.out, "gpu_check", markdown(rows))
    return 1 if any(r.get("ok") is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
