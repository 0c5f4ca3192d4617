"""The HTTP service (issue 14): a real `ddpm-deploy serve` process on 127.0.0.1, a real client (httpx).

Determinism under step-level batching (concurrent mixed requests = serial `run`), the bad-request table,
cancellation on disconnect, a backend failure that fails one request only, and the Ray Serve deployment.
"""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest

from conftest import SERVE_MAX_N, assert_one_line_error, cli

httpx = pytest.importorskip("httpx")

from ddpm_deploy.serve.process import ServeProcess, free_port  # noqa: E402
from ddpm_deploy.tolerances import SERVE_BATCHING_X0_ATOL  # noqa: E402

MAX_N = SERVE_MAX_N


@pytest.fixture(scope="module")
def pipe(tiny_onnx):
    """`run`'s pipeline on the same file (onnxruntime, as the server uses for an .onnx)."""
    from ddpm_deploy.runtime import load

    with load(tiny_onnx, backend="onnxruntime") as p:
        yield p


def generate(url: str, timeout: float = 60.0, **body) -> httpx.Response:
    return httpx.post(url + "/generate", json=body, timeout=timeout)


def npy(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-npy"
    return np.load(io.BytesIO(r.content), allow_pickle=False)


def test_info_and_health(server, tiny_onnx):
    from ddpm_deploy.artifact.manifest import Manifest

    info = httpx.get(server.url + "/info", timeout=5)
    want = Manifest.read(tiny_onnx).to_dict()
    want["source"]["name"] = want["source"]["name"].rsplit("/", 1)[-1]     # no host path (issue 21)
    assert info.status_code == 200 and info.json() == want
    h = server.health()
    assert h["status"] == "ok" and h["backend"] == "onnxruntime-cpu" and h["max_batch"] == 4


def test_png_zip_equals_run_images(server, pipe):
    from PIL import Image

    r = generate(server.url, n=3, seed=11, sampler="ddim", steps=10, format="png")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip", r.text
    assert r.headers["x-images"] == "3" and r.headers["x-steps"] == "10"
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        assert zf.namelist() == ["00000.png", "00001.png", "00002.png"]
        got = np.stack([np.asarray(Image.open(io.BytesIO(zf.read(n)))) for n in zf.namelist()])
    want = pipe.sample(3, seed=11, sampler="ddim", steps=10)          # uint8 (N, H, W, C), as `run` saves
    np.testing.assert_array_equal(got, want[..., 0])


# (n, seed, sampler, steps, eta): different samplers, step counts and sizes, so rows sit at different timesteps
MIXED = [(3, 1, "ddpm", None, 0.0), (2, 2, "ddim", 10, 0.0), (5, 3, "ddim", 7, 1.0), (1, 4, "ddpm", 20, 0.0),
         (4, 5, "ddim", 50, 0.0), (2, 6, "ddpm", 13, 0.0), (6, 7, "ddim", 25, 0.5), (1, 8, "ddpm", 50, 0.0)]


def test_eight_concurrent_mixed_clients_match_serial_run(server, pipe):
    before = server.health()["engine_calls"]
    start, results = threading.Barrier(len(MIXED)), {}

    def client(case):
        n, seed, sampler, steps, eta = case
        start.wait()
        results[case] = generate(server.url, n=n, seed=seed, sampler=sampler, steps=steps, eta=eta, format="npy")

    threads = [threading.Thread(target=client, args=(c,)) for c in MIXED]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    calls = server.health()["engine_calls"] - before
    serial_calls = 0
    for case in MIXED:
        n, seed, sampler, steps, eta = case
        want = pipe.sample(n, seed=seed, sampler=sampler, steps=steps, eta=eta, output="float")
        got = npy(results[case])
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=SERVE_BATCHING_X0_ATOL, err_msg=str(case))
        serial_calls += pipe.last_timing["steps"] * -(-n // 4)
    # the requests really shared engine calls (one request at a time would need serial_calls of them)
    assert calls < serial_calls, (calls, serial_calls)


def _generate_concurrently(url: str, cases) -> dict:
    """POST every (n, seed, sampler, steps, eta) case at once, one client thread each; {case: npy response}."""
    results = {}
    threads = [threading.Thread(target=lambda c=c: results.__setitem__(c, generate(
        url, n=c[0], seed=c[1], sampler=c[2], steps=c[3], eta=c[4], format="npy"))) for c in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_multistep_samplers_carry_their_history_per_row(server, pipe):
    """Multistep samplers (DPM-Solver++, UniPC: a history per image) mixed with DDIM in one running batch."""
    from ddpm_deploy.sampling.spec import SAMPLERS

    multistep = [s for s in SAMPLERS if s not in ("ddpm", "ddim", "distilled")]
    cases = [(2 + i % 2, 20 + i, name, 8 + 3 * i, 0.0) for i, name in enumerate(multistep)] + [(2, 30, "ddim", 9, 0.0)]
    results = _generate_concurrently(server.url, cases)
    for case in cases:
        n, seed, sampler, steps, eta = case
        want = pipe.sample(n, seed=seed, sampler=sampler, steps=steps, eta=eta, output="float")
        np.testing.assert_allclose(npy(results[case]), want, rtol=0, atol=SERVE_BATCHING_X0_ATOL, err_msg=sampler)


def test_npy_equals_the_run_command(server, tiny_onnx, tmp_path):
    r = cli("run", "--engine", tiny_onnx, "--backend", "onnxruntime", "-n", 3, "--seed", 9, "--sampler", "ddim",
            "--steps", 10, "--eta", 1.0, "-o", tmp_path / "g.png", "--save-npy", tmp_path / "x.npy", "--quiet")
    assert r.returncode == 0, r.stderr
    got = npy(generate(server.url, n=3, seed=9, sampler="ddim", steps=10, eta=1.0, format="npy"))
    np.testing.assert_allclose(got, np.load(tmp_path / "x.npy"), rtol=0, atol=SERVE_BATCHING_X0_ATOL)


def test_one_request_at_a_time_baseline_gives_the_same_images(tiny_onnx, pipe):
    """`--batching request` (the load test's baseline) runs each request's chain alone: engine calls add up."""
    s = ServeProcess("--engine", tiny_onnx, "--batching", "request")
    try:
        cases = MIXED[:3]
        results = _generate_concurrently(s.url, cases)
        serial_calls = 0
        for case in cases:
            n, seed, sampler, steps, eta = case
            want = pipe.sample(n, seed=seed, sampler=sampler, steps=steps, eta=eta, output="float")
            np.testing.assert_allclose(npy(results[case]), want, rtol=0, atol=SERVE_BATCHING_X0_ATOL)
            serial_calls += pipe.last_timing["steps"] * -(-n // 4)
        h = s.health()
        assert h["batching"] == "request" and h["engine_calls"] == serial_calls, (h, serial_calls)
    finally:
        s.close()


BAD = [  # (raw body, extra headers, status, words in the one-line reason)
    (b'{"n": 0}', {}, 422, ["n must be between 1 and 64"]),
    (b'{"n": -3}', {}, 422, ["n must be between"]),
    (b'{"n": 65}', {}, 422, ["cap", "got 65"]),
    (b'{"n": "4"}', {}, 422, ["n must be an integer"]),
    (b'{"n": 1, "sampler": "euler"}', {}, 422, ["unknown sampler 'euler'", "ddim"]),
    (b'{"n": 1, "steps": 51}', {}, 422, ["steps must be between 1 and T=50"]),
    (b'{"n": 1, "steps": 0}', {}, 422, ["steps must be between"]),
    (b'{"n": 1, "eta": -0.5}', {}, 422, ["eta must be"]),
    (b'{"n": 1, "eta": NaN}', {}, 422, ["eta must be a finite"]),
    (b'{"n": 1, "seed": -1}', {}, 422, ["seed must be"]),
    (b'{"n": 1, "format": "gif"}', {}, 422, ["format must be one of png, npy"]),
    (b'{"n": 1, "colour": 2}', {}, 422, ["unknown field(s) colour"]),
    (b'[1, 2]', {}, 422, ["JSON object"]),
    (b'{"n": 1', {}, 400, ["malformed JSON"]),
    (b'\xff\xfe', {}, 400, ["malformed JSON"]),
    (b'', {}, 400, ["empty body"]),
    (b' ' * 100_000, {}, 413, ["over the 16384-byte limit"]),
]


@pytest.mark.parametrize("body,headers,status,words", BAD, ids=[f"{s}-{i}" for i, (_, _, s, _) in enumerate(BAD)])
def test_bad_requests_get_a_one_line_4xx(server, body, headers, status, words):
    r = httpx.post(server.url + "/generate", content=body, headers={"content-type": "application/json", **headers},
                   timeout=30)
    assert r.status_code == status, (r.status_code, r.text)
    reason = r.json()["error"]
    assert "\n" not in reason and all(w in reason for w in words), reason


def test_bad_routes_and_chunked_huge_body_then_still_serving(server, pipe):
    assert httpx.get(server.url + "/nope", timeout=5).status_code == 404
    r = httpx.get(server.url + "/generate", timeout=5)
    assert r.status_code == 405 and "GET /generate" in r.json()["error"]
    chunks = (b" " * 4096 for _ in range(10))        # no content-length: counted as it streams
    r = httpx.post(server.url + "/generate", content=chunks, timeout=30)
    assert r.status_code == 413 and "limit" in r.json()["error"]
    got = npy(generate(server.url, n=2, seed=5, sampler="ddim", steps=5, format="npy"))
    np.testing.assert_allclose(got, pipe.sample(2, seed=5, sampler="ddim", steps=5, output="float"), rtol=0,
                               atol=SERVE_BATCHING_X0_ATOL)


def test_disconnected_client_frees_its_rows(server):
    before = server.health()
    full_calls = 50 * (MAX_N // 4)                    # the whole request: 16 waves of 4 rows x 50 DDPM steps
    with pytest.raises(httpx.TimeoutException):
        generate(server.url, timeout=0.3, n=MAX_N, seed=0, sampler="ddpm", format="npy")
    deadline, last_calls = time.time() + 10, None
    while time.time() < deadline:   # settled: cancelled, no rows, and the engine call in flight at the cancel done
        h = server.health()
        if (h["cancelled"] > before["cancelled"] and h["active_rows"] == 0 and h["queued_rows"] == 0
                and h["engine_calls"] == last_calls):
            break
        last_calls = h["engine_calls"]
        time.sleep(0.05)
    assert h["cancelled"] == before["cancelled"] + 1 and h["active_rows"] == 0 and h["queued_rows"] == 0, h
    assert h["completed"] == before["completed"]
    assert h["engine_calls"] - before["engine_calls"] < full_calls, (h, before)
    time.sleep(0.3)
    assert server.health()["engine_calls"] == h["engine_calls"]   # nothing keeps running for the gone client


@pytest.fixture(scope="module")
def nan_onnx(tiny_onnx, tmp_path_factory) -> str:
    """A model that overflows at exactly one timestep: eps = 0.1 x_t / (t - 7), infinite at t = 7.

    A real ONNX file with the tiny model's manifest, on the real runtime: DDPM over all 50 steps reaches t = 7,
    DDIM with 10 steps (t = 45, 40, ..., 0) never does."""
    import onnx
    from onnx import TensorProto, helper

    from ddpm_deploy.artifact.manifest import Manifest, set_onnx_manifest

    manifest = Manifest.read(tiny_onnx)
    c, h, w = manifest.image_shape
    nodes = [helper.make_node("Sub", ["t", "seven"], ["dt"]),
             helper.make_node("Reshape", ["dt", "col"], ["dt4"]),
             helper.make_node("Div", ["x_t", "dt4"], ["q"]),
             helper.make_node("Mul", ["q", "tenth"], ["eps"])]
    inits = [helper.make_tensor("seven", TensorProto.FLOAT, [], [7.0]),
             helper.make_tensor("tenth", TensorProto.FLOAT, [], [0.1]),
             helper.make_tensor("col", TensorProto.INT64, [4], [-1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "nan_at_t7",
                              [helper.make_tensor_value_info("x_t", TensorProto.FLOAT, ["B", c, h, w]),
                               helper.make_tensor_value_info("t", TensorProto.FLOAT, ["B"])],
                              [helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["B", c, h, w])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    set_onnx_manifest(model, manifest)
    path = tmp_path_factory.mktemp("nan") / "nan_at_t7.onnx"
    onnx.save(model, str(path))
    return str(path)


def test_nonfinite_eps_fails_that_request_only(nan_onnx):
    from ddpm_deploy.runtime import load

    s = ServeProcess("--engine", nan_onnx, "--max-batch", 8)
    try:
        results = {}

        def client(name, **body):
            results[name] = generate(s.url, format="npy", **body)

        threads = [threading.Thread(target=client, args=("ddpm",), kwargs=dict(n=2, seed=1, sampler="ddpm")),
                   threading.Thread(target=client, args=("ddim",), kwargs=dict(n=3, seed=2, sampler="ddim",
                                                                               steps=10))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        bad = results["ddpm"]
        error = bad.json()["error"]
        assert bad.status_code == 500 and "non-finite values at step" in error and "t=7" in error
        with load(nan_onnx, backend="onnxruntime") as p:
            want = p.sample(3, seed=2, sampler="ddim", steps=10, output="float")
        np.testing.assert_allclose(npy(results["ddim"]), want, rtol=0, atol=SERVE_BATCHING_X0_ATOL)
        h = s.health()
        assert h["failed"] == 1 and h["completed"] == 1 and h["active_rows"] == 0, h
        np.testing.assert_allclose(npy(generate(s.url, n=1, seed=2, sampler="ddim", steps=10, format="npy")),
                                   want[:1], rtol=0, atol=SERVE_BATCHING_X0_ATOL)   # still serving
    finally:
        s.close()


def test_serve_command_errors_are_one_line(tmp_path, tiny_onnx):
    assert_one_line_error(cli("serve", "--engine", tmp_path / "missing.onnx", "--port", free_port()), "missing.onnx")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_one_line_error(cli("serve", "--engine", tiny_onnx, "--port", port), "cannot listen", str(port))
    assert_one_line_error(cli("serve", "--engine", tiny_onnx, "--replicas", 2), "--ray")
    assert_one_line_error(cli("serve", "--engine", tiny_onnx, "--precision", "bf16", "--port", free_port()),
                          "--precision applies to --backend openvino")


@pytest.mark.slow
def test_ray_serve_replicas_serve_the_same_images(tiny_onnx, pipe):
    """The same app as a Ray Serve deployment on a local Ray (2 CPUs), two replicas, each with its own runtime."""
    pytest.importorskip("ray")
    s = ServeProcess("--engine", tiny_onnx, "--ray", "--replicas", 2, startup_s=180)
    try:
        pids = {s.health()["pid"] for _ in range(12)}
        assert len(pids) == 2 and s.proc.pid not in pids, pids      # two replica processes answer, not the driver
        results = {}

        def client(case):
            n, seed, sampler, steps, eta = case
            results[case] = generate(s.url, n=n, seed=seed, sampler=sampler, steps=steps, eta=eta, format="npy")

        cases = MIXED[:4]
        threads = [threading.Thread(target=client, args=(c,)) for c in cases]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for n, seed, sampler, steps, eta in cases:
            want = pipe.sample(n, seed=seed, sampler=sampler, steps=steps, eta=eta, output="float")
            np.testing.assert_allclose(npy(results[(n, seed, sampler, steps, eta)]), want, rtol=0,
                                       atol=SERVE_BATCHING_X0_ATOL)
        r = generate(s.url, n=MAX_N + 1)
        assert r.status_code == 422 and "cap" in r.json()["error"]
    finally:
        s.close(timeout=60)


def test_embedded_server_needs_neither_ray_nor_torch():
    code = ("import sys, ddpm_deploy.serve.app, ddpm_deploy.generate.ray_driver, ddpm_deploy.cli; "
            "bad = [m for m in ('ray', 'torch') if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def access_lines(s: ServeProcess, words: str, wait: float = 5.0) -> list[str]:
    """The server's output lines containing `words`, waiting up to `wait` s for one (a request's line is written
    once its response is sent, so just after the client has it)."""
    deadline = time.time() + wait
    while True:
        lines = [ln for ln in s.output().splitlines() if words in ln]
        if lines or time.time() > deadline:
            return lines
        time.sleep(0.05)


def test_one_access_line_per_request(server):
    """Like uvicorn's access log: client, request line, status, images and engine calls of a /generate, seconds,
    and a refusal's reason."""
    import re

    r = generate(server.url, n=3, seed=21, sampler="ddim", steps=4, format="npy")
    assert r.status_code == 200
    bad = generate(server.url, n=MAX_N + 1, seed=22)
    assert bad.status_code == 422
    httpx.get(server.url + "/healthz?probe=1", timeout=5)
    pattern = re.compile(r'^INFO: +127\.0\.0\.1:\d+ "POST /generate HTTP/1\.1" 200 images 3 engine-calls (\d+) '
                         r'(\d+\.\d{3}) s$')
    access_lines(server, '"GET /healthz?probe=1')   # the last request's line is there: so are the others
    lines = [m for ln in server.output().splitlines() if (m := pattern.match(ln))]
    assert any(int(m[1]) == int(r.headers["X-Engine-Calls"]) for m in lines), server.output()[-2000:]
    refused = access_lines(server, '"POST /generate HTTP/1.1" 422')
    assert refused and f"n must be between 1 and {MAX_N}" in refused[-1] and "images" not in refused[-1], refused
    assert access_lines(server, '"GET /healthz?probe=1 HTTP/1.1" 200'), server.output()[-2000:]
    httpx.get(server.url + "/x%0Afake-line%1b[31m", timeout=5)     # a path that would start a log line of its own
    assert access_lines(server, '"GET /x\\nfake-line\\x1b[31m HTTP/1.1" 404'), server.output()[-2000:]
    assert not [ln for ln in server.output().splitlines() if ln.startswith("fake-line")]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_are_a_clean_stop(tiny_onnx, sig):
    """Ctrl-C (SIGINT) or SIGTERM: a line saying it drains, one when stopped, exit status 0 (Ctrl-C was
    `error: interrupted`, exit 130; SIGTERM killed the process by the signal)."""
    import os
    import signal

    s = ServeProcess("--engine", tiny_onnx)
    try:
        assert generate(s.url, n=1, sampler="ddim", steps=2).status_code == 200
        os.kill(s.proc.pid, getattr(signal, sig))
        assert s.proc.wait(20) == 0, (s.proc.returncode, s.output()[-2000:])
        out = s.output()
        assert "error" not in out.lower() and "Traceback" not in out, out[-2000:]
        assert access_lines(s, f"shutting down ({sig}): 0 requests in flight"), out[-2000:]
        assert access_lines(s, "stopped: 1 requests completed, 0 failed"), out[-2000:]
    finally:
        s.close()


def test_quiet_and_log_level(tiny_onnx):
    s = ServeProcess("--engine", tiny_onnx, "--quiet")
    try:
        assert generate(s.url, n=1, sampler="ddim", steps=2).status_code == 200
        s.close()
        assert s.proc.returncode == 0 and not access_lines(s, "INFO", wait=0), s.output()[-2000:]
    finally:
        s.close()
    assert_one_line_error(cli("serve", "--engine", tiny_onnx, "--log-level", "loud"), "--log-level")
