"""The TensorRT backend's pointer plumbing on the CPU: an EMULATION of the CUDA runtime and of TensorRT.

What is emulated (nothing here runs on a GPU):
- `FakeCudart` (tests/fake_cudart.py) stands in for `cuda.bindings.runtime`: device memory is a numpy heap with 256-byte aligned
  allocations that are never reused (so a read of freed memory is caught, not silently served), a stream queues
  work and runs it at synchronization (so work really is asynchronous to the host), stream capture records the
  enqueued operations with their addresses into a graph, and a launch replays them. Synchronous calls during a
  capture invalidate it, as CUDA does. A bad access is a sticky error: every later call fails, as on a GPU.
- the `tensorrt` module is tests/fake_tensorrt.py (shared with benchmarks/gpu_check.py), whose engine here is
  `OnnxEngine`: the "engine" is the fused step ONNX, and a context's enqueue (execute_async_v3) queues the fused
  step on onnxruntime CPU, reading and writing the heap at the addresses bound to it *at enqueue time* (a captured
  graph keeps those, as a CUDA graph keeps kernel arguments). setTensorAddress refuses addresses that are not
  256-byte aligned (NvInferRuntime.h), the first enqueue after a shape change cannot be captured (TensorRT's lazy
  setup), and replaying a graph after the context's addresses or shapes changed raises `UndefinedReplay`
  (TensorRT: re-capture after changing them).

What this proves: the backend's buffers, tables, noise windows, state copies, batch changes, callback path and
eps() and the HTTP batcher's row slots give the host loop's numbers through the real `TensorRTBackend` and
`ddpm_deploy.loop` code.
What it cannot show: that real TensorRT, cuda-bindings or a GPU behave as emulated (TensorRT's real capture rules,
timing, memory limits, fp16 engine numerics). The emulated API offers only names and argument names the real
bindings have (tests/test_tensorrt_conformance.py). Those need `benchmarks/gpu_check.py` and the
`gpu` tests on a GPU machine.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

from ddpm_deploy.errors import UserError
from ddpm_deploy.files import sha256_bytes
from ddpm_deploy.artifact.manifest import Manifest
from ddpm_deploy.sampling.noise import ChunkNoise
from ddpm_deploy.fused_io import COL
from ddpm_deploy.sampling.plan import SamplingPlan
from ddpm_deploy.tolerances import FUSED_CHAIN_ATOL, FUSED_STEP_ATOL
from fake_cudart import FakeCudart, UndefinedReplay, cudaMemcpyKind, cudart_module
from fake_tensorrt import fake_tensorrt

FAKE_TRT_VERSION = "10.99.0.1"

# ---------------------------------------------------------------------------------------------- fake TensorRT

class OnnxEngine:
    """The emulated engine (tests/fake_tensorrt.py's `open_engine`): the engine file is the fused-step ONNX, and an
    enqueue queues it on onnxruntime CPU, reading and writing `rt`'s heap at the addresses bound *at enqueue time*
    (a captured graph keeps those, as a CUDA graph keeps kernel arguments). Replaying a graph after its context's
    addresses or shapes changed raises UndefinedReplay (TensorRT: re-capture after changing them)."""

    def __init__(self, rt: FakeCudart, data: bytes):
        import onnxruntime as ort

        self.rt, self.session = rt, ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        dims = lambda args: {a.name: tuple(d if isinstance(d, int) else -1 for d in a.shape) for a in args}  # noqa: E731
        self.inputs, self.outputs = dims(self.session.get_inputs()), dims(self.session.get_outputs())

    def enqueue(self, stream, addrs, shapes, context):
        def still_bound():
            if self.rt.strict_replay and (context._addrs != addrs or context._shapes != shapes):
                raise UndefinedReplay("graph replayed after its context's tensor addresses or shapes changed")

        self.rt.enqueue(stream, ("enqueueV3", still_bound, addrs, lambda: self.run(addrs, shapes)))

    def run(self, addrs, shapes):
        def read(name):
            n = 4 * int(np.prod(shapes[name]))
            return self.rt.view(addrs[name], n).view(np.float32).reshape(shapes[name]).copy()

        outs = self.session.run(list(self.outputs), {name: read(name) for name in self.inputs})
        for name, value in zip(self.outputs, outs):
            self.rt.view(addrs[name], value.nbytes)[:] = np.ascontiguousarray(value, np.float32).view(np.uint8).ravel()


def emulated_tensorrt(rt: FakeCudart, max_batch: int) -> types.ModuleType:
    """The shared stand-in `tensorrt` (tests/fake_tensorrt.py) with OnnxEngine engines over `rt`."""
    trt = fake_tensorrt(FAKE_TRT_VERSION, lambda data: OnnxEngine(rt, data), max_batch,
                        capturing=lambda stream: int(stream) in rt.capturing)
    rt.trt = trt
    return trt


@pytest.fixture()
def emulated(monkeypatch):
    """Install the emulated cuda.bindings.runtime and tensorrt; returns the runtime (its heap, graphs, faults)."""

    def install(strict_replay: bool = True, max_batch: int = 4) -> FakeCudart:
        rt = FakeCudart(strict_replay)
        trt = emulated_tensorrt(rt, max_batch)
        cuda, bindings, runtime = types.ModuleType("cuda"), types.ModuleType("cuda.bindings"), cudart_module(rt)
        cuda.bindings, bindings.runtime = bindings, runtime
        for name, mod in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", runtime),
                          ("tensorrt", trt)):
            monkeypatch.setitem(sys.modules, name, mod)
        return rt

    return install


@pytest.fixture(scope="module")
def engine(tiny_onnx, tmp_path_factory) -> str:
    """An "engine" file: the fused step ONNX, with the sidecar `ddpm-deploy build` writes for the emulated GPU."""
    return emulated_engine(tiny_onnx, tmp_path_factory.mktemp("engine") / "tiny.trt")


def emulated_engine(onnx_path: str, path) -> str:
    from ddpm_deploy.runtime.backends.onnxruntime_iobinding import fused_model_bytes
    from ddpm_deploy.runtime.backends.tensorrt_build import engine_manifest, publish_engine

    onnx_m = Manifest.read(onnx_path)
    data = fused_model_bytes(onnx_path, onnx_m)
    m = engine_manifest(onnx_m, trt_version=FAKE_TRT_VERSION, gpu_name="Emulated GPU", compute_capability="9.0",
                        onnx_sha256=sha256_bytes(Path(onnx_path).read_bytes()), engine_sha256=sha256_bytes(data),
                        batch={"min": 1, "opt": 4, "max": 4})
    publish_engine(data, path, m)
    return str(path)


def host(tiny_onnx):
    from ddpm_deploy.runtime import load

    return load(tiny_onnx, backend="onnxruntime", threads=1, fused_step=False)  # the numpy host loop


def multistep_plan(plan: SamplingPlan) -> SamplingPlan:
    """`plan` with history terms switched on (small corrector and predictor weights on h[0..3]): exercises the
    hist -> hist_out ping-pong whatever samplers the package ships."""
    coefs = plan.coefs.copy()
    for name, value in (("u_l", 0.05), ("u_1", -0.03), ("u_2", 0.02), ("u_3", 0.01), ("p_1", 0.04), ("p_2", -0.02)):
        coefs[1:, COL[name]] = value
    multi = SamplingPlan(plan.sampler, plan.timesteps, coefs, plan.eta, plan.learned_variance)
    assert multi.uses_history
    return multi


# ---------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("sampler,eta,steps", [("ddpm", 0.0, None), ("ddim", 1.0, 10), ("ddim", 0.0, 7)])
def test_emulated_engine_matches_host_loop(emulated, engine, tiny_onnx, sampler, eta, steps):
    """Through the public path: load(engine) gives the host loop's x_0 (5 images: batches 4 then 1), on the
    graph path and the enqueue path, and really replays a captured graph every step."""
    from ddpm_deploy.runtime import load

    rt = emulated()
    with host(tiny_onnx) as cpu:
        want = cpu.sample(5, seed=3, sampler=sampler, eta=eta, steps=steps, batch_size=4, output="float")
    for graph in (True, False):
        with load(engine, cuda_graph=graph) as gpu:
            assert type(gpu.backend).__name__ == "TensorRTBackend"
            got = gpu.sample(5, seed=3, sampler=sampler, eta=eta, steps=steps, batch_size=4, output="float")
            K = gpu.plan(sampler, steps, eta).steps
            np.testing.assert_allclose(got, want, rtol=0, atol=FUSED_CHAIN_ATOL)
            assert gpu.backend.graph_launches == (2 * K if graph else 0)
            assert gpu.backend._cuda.graphs_captured == (2 if graph else 0)  # one per batch size (4, then 1)
            assert gpu.backend.engine_time.count == 2 * K
    assert rt.faults == [] and rt.live == {}  # every buffer freed, nothing read out of bounds


def test_emulated_callback_windows_and_eps(emulated, engine, tiny_onnx):
    """Callback path = fast path exactly; noise in 3-step windows = one window exactly; eps() between chains
    equals the eps graph and leaves the next chain unchanged; each step's StepInfo matches the numpy step."""
    from ddpm_deploy.runtime import load
    from ddpm_deploy.sampling.step import step

    emulated()
    with host(tiny_onnx) as cpu, load(engine) as gpu:
        plan = gpu.plan("ddim", 10, 1.0)
        n = 3
        fast = gpu.backend.run_chain(ChunkNoise(gpu.image_shape, 0, n, seed=1), plan)
        z = ChunkNoise(gpu.image_shape, 0, n, seed=1).all_z(plan.steps)
        seen = []

        def check(info):
            ref = cpu.backend.eps(info.x_t, np.full((n,), info.t, np.float32))
            np.testing.assert_allclose(info.model_output, ref, rtol=0, atol=FUSED_STEP_ATOL)
            np.testing.assert_allclose(info.x_prev, step(info.x_t, info.model_output, z[info.k], plan.coefs[info.k]),
                                       rtol=0, atol=FUSED_STEP_ATOL)
            assert info.hist is None and info.hist_out is None  # a history-free plan reports none
            seen.append(info.k)

        slow = gpu.backend.run_chain(ChunkNoise(gpu.image_shape, 0, n, seed=1), plan, callback=check)
        assert seen == list(range(plan.steps)) and np.array_equal(slow, fast)
        x = np.random.default_rng(0).standard_normal((2, 1, 8, 8), dtype=np.float32)
        t = np.array([3, 40], np.float32)
        np.testing.assert_allclose(gpu.backend.eps(x, t), cpu.backend.eps(x, t), rtol=0, atol=FUSED_STEP_ATOL)
        gpu.backend.noise_window_bytes = 3 * fast.nbytes  # 3 steps of noise per window: 4 windows
        again = gpu.backend.run_chain(ChunkNoise(gpu.image_shape, 0, n, seed=1), plan)
        assert np.array_equal(again, fast)


def test_emulated_history_ping_pong(emulated, engine, tiny_onnx):
    """A plan that reads the history: x_0 and every step's hist / hist_out equal the host loop's."""
    from ddpm_deploy.runtime import load

    emulated()
    with host(tiny_onnx) as cpu, load(engine) as gpu:
        plan = multistep_plan(gpu.plan("ddim", 8, 0.5))
        want, got = [], []
        x_cpu = cpu.backend.run_chain(ChunkNoise(gpu.image_shape, 0, 2, seed=7), plan, callback=want.append)
        x_gpu = gpu.backend.run_chain(ChunkNoise(gpu.image_shape, 0, 2, seed=7), plan, callback=got.append)
        np.testing.assert_allclose(x_gpu, x_cpu, rtol=0, atol=FUSED_CHAIN_ATOL)
        for a, b in zip(got, want):
            assert a.hist is not None and a.hist_out is not None
            np.testing.assert_allclose(a.hist, b.hist, rtol=0, atol=FUSED_CHAIN_ATOL)
            np.testing.assert_allclose(a.hist_out, b.hist_out, rtol=0, atol=FUSED_CHAIN_ATOL)
        assert np.array_equal(gpu.backend.run_chain(ChunkNoise(gpu.image_shape, 0, 2, seed=7), plan), x_gpu)


def test_emulated_nonfinite_step_is_named(emulated, tiny_onnx, tmp_path):
    """Issue 21 item 9 on the TensorRT path: an x_0-prediction that overflows at one step (the clip would hide it)
    is refused naming that step, on the graph and enqueue paths and with a callback; a plan that is not finite in
    float32 is refused before anything runs on the device; nothing leaks either way."""
    from test_finiteness import BAD_STEP, inject_eps_onnx, overflow_attack

    from ddpm_deploy.errors import NonFiniteError
    from ddpm_deploy.runtime import load

    plan = load(tiny_onnx, backend="onnxruntime", threads=1).plan("ddim", 6)
    t_bad = int(plan.timesteps[BAD_STEP])
    path = emulated_engine(inject_eps_onnx(tiny_onnx, str(tmp_path / "shifted.onnx"), t_bad, 4.0), tmp_path / "e.trt")
    rt = emulated()
    for graph in (True, False):
        with load(path, cuda_graph=graph) as gpu:
            noise = lambda: ChunkNoise(gpu.image_shape, 0, 3, seed=2)  # noqa: E731
            assert np.isfinite(gpu.backend.run_chain(noise(), plan)).all()
            for attack in ("inf", "nan"):
                for callback in (None, lambda info: None):
                    with pytest.raises(NonFiniteError, match=rf"step {BAD_STEP} \(t={t_bad}\).*image 0, 1, 2 of"):
                        gpu.backend.run_chain(noise(), overflow_attack(plan, attack), callback=callback)
            coefs = plan.coefs.copy()
            coefs[1, COL["a_x"]] = 1e39  # inf in float32
            launches = gpu.backend.engine_time.count
            with pytest.raises(UserError, match=r"non-finite coefficient a_x = 1e\+39 .*step 1 \(t="):
                gpu.backend.run_chain(noise(), SamplingPlan(plan.sampler, plan.timesteps, coefs, plan.eta))
            assert gpu.backend.engine_time.count == launches
    assert rt.faults == [] and rt.live == {}


def test_engine_of_another_fused_interface_is_refused(emulated, tiny_onnx, tmp_path, monkeypatch):
    """Issue 22 item 4: an engine runs only under the fused-step interface it was compiled for. A sidecar from
    before the version was recorded, and an engine built before the version flips, are refused by `load` with the
    rebuild command before anything runs on the device; an engine built after the flip runs."""
    import json

    from ddpm_deploy import fused_io
    from ddpm_deploy.artifact.manifest import sidecar_path
    from ddpm_deploy.runtime import load

    rt = emulated()
    path = emulated_engine(tiny_onnx, tmp_path / "old.trt")
    side = sidecar_path(path)
    recorded = json.loads(side.read_text())
    assert recorded["fused_interface"] == fused_io.FUSED_INTERFACE_VERSION
    rebuild = f"`ddpm-deploy build MODEL.onnx -o {path}`"
    unversioned = {k: v for k, v in recorded.items() if k != "fused_interface"}  # as sidecars were written before
    side.write_text(json.dumps(unversioned))
    with pytest.raises(UserError, match="records no fused-step interface version") as e:
        load(path)
    assert rebuild in str(e.value) and "\n" not in str(e.value)
    side.write_text(json.dumps(recorded))
    load(path).close()
    monkeypatch.setattr(fused_io, "FUSED_INTERFACE_VERSION", fused_io.FUSED_INTERFACE_VERSION + 1)
    with pytest.raises(UserError, match=rf"built for fused-step interface {recorded['fused_interface']}, but this "
                                        rf"ddpm-deploy runs interface {recorded['fused_interface'] + 1}") as e:
        load(path)
    assert rebuild in str(e.value)
    with load(emulated_engine(tiny_onnx, tmp_path / "new.trt")) as gpu:  # rebuilt: runs
        assert np.isfinite(gpu.sample(1, seed=0, sampler="ddim", steps=2, output="float")).all()
    assert rt.faults == [] and rt.live == {}


def test_gpu_check_stand_in_engine_opens(emulated, tmp_path, monkeypatch):
    """benchmarks/gpu_check.py's engine (its sidecar and the shared stand-in module with its kernel engine's IO) passes
    every check TensorRTBackend makes when it opens an engine, on the emulated device: what used to break only on a
    GPU machine (a sidecar check or engine method added to the backend and not to gpu_check's own fake)."""
    import importlib.util

    from ddpm_deploy.runtime import load
    from ddpm_deploy.runtime.cuda import require_gpu

    benchmarks = Path(__file__).parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))  # as when run as a script: its folder on sys.path
    spec = importlib.util.spec_from_file_location("gpu_check", benchmarks / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    rt = emulated()
    trt = fake_tensorrt("stand-in", lambda data: gpu_check.KernelEngine(kernel=None), max(gpu_check.BATCHES))
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with load(gpu_check.write_engine(tmp_path, require_gpu(), "stand-in")) as pipe:
        assert pipe.backend.name == "tensorrt-fp32" and pipe.image_shape == gpu_check.SHAPE
        assert trt._engine._contexts and pipe.backend.max_batch == max(gpu_check.BATCHES)
    assert rt.faults == [] and rt.live == {}


def test_table_rows_are_256_byte_aligned(emulated, engine):
    """Every table row the loop uploads starts 256 bytes apart, so rows bound or copied from are aligned."""
    from ddpm_deploy.loop.run import step_tables
    from ddpm_deploy.loop.tables import aligned_rows
    from ddpm_deploy.runtime import load

    emulated()
    with load(engine) as gpu:
        t, c = step_tables(gpu.plan("ddim", 5), 3)
        for table in (t, c, np.zeros((4, 3, 1, 8, 8), np.float32)):
            rows = aligned_rows(table)
            assert rows.strides[0] % 256 == 0
            assert np.array_equal(rows[:, :table[0].size].reshape(table.shape), table)


class RebindingTensorRT:
    """The defect of issue 12 item 1, kept as a test double: per-step inputs bound straight into the table rows
    by setTensorAddress while replaying the graph captured before (what an IO-binding style loop does)."""

    @staticmethod
    def bind_step(self, k, j):
        ctx = self._context
        ctx.set_tensor_address("t", self._t_rows + k * self._t_stride)
        ctx.set_tensor_address("coefs", self._c_rows + k * self._c_stride)
        ctx.set_tensor_address("z", self._z_tab + j * self._z_stride)
        self._k = k  # the step whose `nonfinite` flag launch() keeps, as the real bind_step records it


@pytest.mark.parametrize("strict", [True, False])
def test_emulation_catches_replay_after_rebinding(emulated, engine, tiny_onnx, monkeypatch, strict):
    """The emulation fails a backend whose graph replays read addresses rebound after capture: strictly
    (UndefinedReplay, TensorRT's rule), and by its numbers (the replay reads the captured addresses: x_0 is wrong)."""
    from ddpm_deploy.runtime import load
    from ddpm_deploy.runtime.backends.tensorrt_backend import TensorRTBackend

    emulated(strict_replay=strict)
    with host(tiny_onnx) as cpu:
        plan = cpu.plan("ddim", 10, 1.0)
        want = cpu.backend.run_chain(ChunkNoise(cpu.image_shape, 0, 2, seed=5), plan)
    monkeypatch.setattr(TensorRTBackend, "bind_step", RebindingTensorRT.bind_step)
    with load(engine) as gpu:
        noise = ChunkNoise(gpu.image_shape, 0, 2, seed=5)
        if strict:
            with pytest.raises(UndefinedReplay):
                gpu.backend.run_chain(noise, plan)
        else:
            got = gpu.backend.run_chain(noise, plan)
            assert np.abs(got - want).max() > 100 * FUSED_CHAIN_ATOL


def test_misaligned_address_is_refused(emulated, engine, monkeypatch):
    """setTensorAddress refuses an unaligned pointer; the backend checks the answer and says so."""
    from ddpm_deploy.runtime import load
    from ddpm_deploy.runtime.cuda import CudaDevice

    rt = emulated()
    real_malloc = CudaDevice.malloc
    monkeypatch.setattr(CudaDevice, "malloc", lambda self, n, zero=True: real_malloc(self, n + 256, zero) + 4)
    with pytest.raises(UserError, match="rejected the address"):
        load(engine)
    assert rt.live == {}  # the failed open freed what it had allocated


def test_failure_is_not_hidden_by_cleanup(emulated, engine, tiny_onnx, monkeypatch):
    """A fault mid-chain (a read of freed memory) makes CUDA errors sticky: the error reported is the device's,
    and the cleanup that follows (whose frees fail too) neither hides it nor raises a second one."""
    from ddpm_deploy.runtime import load
    from ddpm_deploy.runtime.backends.tensorrt_backend import TensorRTBackend

    rt = emulated()
    real_put = TensorRTBackend.put_noise

    def put_then_free(self, z_rows):  # a window freed while its steps are still queued
        real_put(self, z_rows)
        rt.live.pop(self._z_tab)

    monkeypatch.setattr(TensorRTBackend, "put_noise", put_then_free)
    gpu = load(engine)
    with pytest.raises(UserError, match="cudaErrorIllegalAddress"):
        gpu.backend.run_chain(ChunkNoise(gpu.image_shape, 0, 2, seed=5), gpu.plan("ddim", 4))
    assert rt.faults and "outside every live allocation" in rt.faults[0]
    with pytest.raises(UserError, match="cudaErrorIllegalAddress"):  # the device stays broken, and says so
        gpu.backend.close()
    gpu.backend.close()  # idempotent


def test_serve_batcher_keeps_rows_in_engine_memory(emulated, engine, monkeypatch):
    """The HTTP batcher on (emulated) TensorRT: rows live in the engine's state buffers. x_t crosses to or from the
    device only when a row joins, gives up its slot (more rows than slots: round-robin) or finishes, never on a step
    where it runs on; each request's images equal `run`'s on the same engine, at any batch-mates."""
    from ddpm_deploy.runtime import load
    from ddpm_deploy.serve.batcher import StepBatcher
    from ddpm_deploy.tolerances import SERVE_BATCHING_X0_ATOL

    rt = emulated()
    traffic = []  # (kind, device address, bytes) of every host <-> device copy
    real_copy = rt.cudaMemcpyAsync

    def counted(dst, src, nbytes, kind, stream):
        if kind != cudaMemcpyKind.cudaMemcpyDeviceToDevice:
            h2d = kind == cudaMemcpyKind.cudaMemcpyHostToDevice
            traffic.append(("h2d" if h2d else "d2h", int(dst if h2d else src), int(nbytes)))
        return real_copy(dst, src, nbytes, kind, stream)

    monkeypatch.setattr(rt, "cudaMemcpyAsync", counted)
    requests = [(3, 1, dict(sampler="ddim", steps=10, eta=1.0)), (2, 2, dict(sampler="dpmpp", steps=6, order=2)),
                (1, 3, dict(sampler="ddpm"))]
    with load(engine) as gpu:
        be = gpu.backend
        assert type(be).__name__ == "TensorRTBackend"
        x_lo = be._buf["x_t"]
        x_hi = x_lo + be.max_batch * int(np.prod(gpu.image_shape)) * 4
        batcher = StepBatcher(be, max_batch=4)
        try:
            traffic.clear()
            jobs = [batcher.submit(n, seed, gpu.plan(**kw)) for n, seed, kw in requests]
            results = [job.future.result(timeout=120) for job in jobs]
            calls = batcher.stats()["engine_calls"]
        finally:
            batcher.close()
        state_copies = [c for c in traffic if x_lo <= c[1] < x_hi]
        rows = sum(n for n, _, _ in requests)
        steps = sum(n * gpu.plan(**kw).steps for n, _, kw in requests)
        # each row: one write when it joins and one read when it finishes, plus a read and a write per lost slot
        moves = len(state_copies) - 2 * rows
        assert moves % 2 == 0 and 0 <= moves < steps // 2, (len(state_copies), rows, steps)
        assert calls < steps  # step-level batching: rows of different requests share engine calls
        for (n, seed, kw), got in zip(requests, results):
            want = gpu.sample(n, seed=seed, output="float", **kw)
            np.testing.assert_allclose(got, want, rtol=0, atol=SERVE_BATCHING_X0_ATOL)
    assert rt.faults == [] and rt.live == {}
