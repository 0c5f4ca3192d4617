"""The server under abuse (issue 21, items 12-15): each test reproduces one attack on a real `ddpm-deploy serve`
process on 127.0.0.1 and checks that the server refuses it in one line and keeps serving the others.

Attacks are bounded (at most ~100 sockets, a few seconds each); every server is stopped by its PID (ServeProcess).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import numpy as np
import pytest

from conftest import SERVE_MAX_N, assert_one_line_error, cli

httpx = pytest.importorskip("httpx")

from ddpm_deploy.serve.process import ServeProcess  # noqa: E402
from ddpm_deploy.tolerances import SERVE_BATCHING_X0_ATOL  # noqa: E402

MAX_N = SERVE_MAX_N

from test_serve import generate, npy, pipe  # noqa: E402,F401  (one copy of the client helpers; pipe: a fixture)


def wait_for(predicate, timeout: float, every: float = 0.05):
    """Poll `predicate()` until it returns something truthy (returned) or `timeout` passes (the last value)."""
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value or time.time() > deadline:
            return value
        time.sleep(every)


def raw(port: int, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    if data:
        s.sendall(data)
    return s


def closed_by_server(s: socket.socket, within: float) -> bool:
    """True when the server closes `s` (EOF, after any response bytes, or a reset) within `within` seconds."""
    s.settimeout(within)
    deadline = time.time() + within
    try:
        while time.time() < deadline:
            if not s.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except OSError:     # socket.timeout: still open
        return False
    return False


def post_head(length: int) -> bytes:
    return (f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


# -- item 12: a client that gave up frees its queue budget at once ----------------------------------------------------

def test_abandoned_requests_free_their_queue_budget(tiny_onnx, pipe):
    """One live n=64 request, then 63 clients post n=64 and give up: the default queue limit (4096 rows) must not
    count the abandoned rows, so a later request is served (it was 503 until the live request ended)."""
    s = ServeProcess("--engine", tiny_onnx, "--max-n", MAX_N, "--max-batch", 1, "--drain-timeout", 0.5)
    try:
        live = threading.Thread(target=lambda: generate(s.url, timeout=120, n=MAX_N, seed=0, sampler="ddpm",
                                                        format="npy"))
        live.start()
        assert wait_for(lambda: s.health()["active_rows"] > 0, 10)

        def abandon(client, seed):
            try:
                client.post(s.url + "/generate", timeout=0.5, json=dict(n=MAX_N, seed=seed, sampler="ddpm"))
            except httpx.TimeoutException:
                pass

        with httpx.Client(limits=httpx.Limits(max_connections=64)) as client:   # one client: 63 are slow to build
            quitters = [threading.Thread(target=abandon, args=(client, seed)) for seed in range(1, 64)]
            for t in quitters:
                t.start()
            for t in quitters:
                t.join(30)
        h = wait_for(lambda: (lambda h: h if h["cancelled"] == 63 else None)(s.health()), 10) or s.health()
        assert h["cancelled"] == 63, h
        assert h["queued_rows"] + h["active_rows"] <= MAX_N, h     # only the live request's rows are held
        r = generate(s.url, timeout=30, n=MAX_N, seed=5, sampler="ddim", steps=2, format="npy")
        np.testing.assert_allclose(npy(r), pipe.sample(MAX_N, seed=5, sampler="ddim", steps=2, output="float"),
                                   rtol=0, atol=SERVE_BATCHING_X0_ATOL)
    finally:
        s.close()
        live.join(10)


# -- item 13: a short request is not stuck behind a long one ----------------------------------------------------------

def test_short_request_is_not_starved_by_a_long_one(tiny_onnx, pipe):
    """Behind one n=32 DDPM-50 request (400 engine calls at batch 4), a 5-step request is served within a few
    engine calls (first-in-first-out admission made it wait for 7 waves of the long one, ~350 calls; with n=64,
    769 calls were measured)."""
    s = ServeProcess("--engine", tiny_onnx, "--max-n", MAX_N)
    try:
        long_result = {}
        live = threading.Thread(target=lambda: long_result.setdefault("r", generate(
            s.url, timeout=120, n=32, seed=3, sampler="ddpm", format="npy")))
        live.start()
        assert wait_for(lambda: s.health()["engine_calls"] >= 10, 10)
        short = generate(s.url, timeout=60, n=1, seed=4, sampler="ddim", steps=5, format="npy")
        # engine calls from the request's queueing to its last step (the server counts them, so HTTP time under
        # load does not count): round-robin serves it in its 5 steps plus the call in flight when it arrived
        during = int(short.headers["X-Engine-Calls"])
        np.testing.assert_allclose(npy(short), pipe.sample(1, seed=4, sampler="ddim", steps=5, output="float"),
                                   rtol=0, atol=SERVE_BATCHING_X0_ATOL)
        assert 5 <= during <= 8, f"the 5-step request waited {during} engine calls behind the long one"
        live.join(120)
        long_x0 = npy(long_result["r"])       # the long one is still served, its first rows equal to `run`'s
        assert long_x0.shape[0] == 32
        np.testing.assert_allclose(long_x0[:4], pipe.sample(4, seed=3, sampler="ddpm", output="float"), rtol=0,
                                   atol=SERVE_BATCHING_X0_ATOL)
    finally:
        s.close()


# -- item 14: slow clients are cut off; connections are bounded -------------------------------------------------------

def test_slow_header_and_slow_body_connections_are_closed(tiny_onnx, pipe):
    s = ServeProcess("--engine", tiny_onnx, "--header-timeout", 1, "--body-timeout", 1)
    socks = []
    try:
        socks += [raw(s.port, b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\n") for _ in range(40)]  # never ends
        socks += [raw(s.port, post_head(100) + b'{"n": 1,') for _ in range(40)]                      # body stalls
        socks += [raw(s.port, b"") for _ in range(20)]                                               # says nothing
        r = generate(s.url, timeout=30, n=2, seed=1, sampler="ddim", steps=5, format="npy")          # others served
        np.testing.assert_allclose(npy(r), pipe.sample(2, seed=1, sampler="ddim", steps=5, output="float"),
                                   rtol=0, atol=SERVE_BATCHING_X0_ATOL)
        time.sleep(1.5)
        still_open = sum(not closed_by_server(x, 2.0) for x in socks)
        assert still_open == 0, f"{still_open} of {len(socks)} slow connections still open"
        assert "Traceback" not in s.output(), s.output()[-3000:]
    finally:
        for x in socks:
            x.close()
        s.close()


def test_connection_and_concurrency_limits(tiny_onnx):
    """Sockets over --max-connections: the oldest idle ones are closed to make room (a new client always gets in)."""
    s = ServeProcess("--engine", tiny_onnx, "--max-connections", 16, "--limit-concurrency", 8,
                     "--header-timeout", 30)
    socks = []
    try:
        socks += [raw(s.port, b"") for _ in range(40)]
        time.sleep(1.0)    # accepted by now (no health poll here: its connections would close more idle ones)
        closed = [closed_by_server(x, 0.2) for x in socks]
        assert sum(closed) >= 40 - 16, f"only {sum(closed)} of 40 connections over --max-connections 16 were closed"
        assert not any(closed[-15:]), closed      # the oldest went; the newest are kept
        r = generate(s.url, timeout=10, n=1, steps=5, sampler="ddim")
        assert r.status_code == 200, (r.status_code, r.text)
        assert s.health()["connections_evicted_idle"] >= 24
    finally:
        for x in socks:
            x.close()
        s.close()


def test_idle_sockets_do_not_lock_clients_out(tiny_onnx, pipe):
    """More idle sockets than --limit-concurrency (the cap on requests in flight), and then more than
    --max-connections: /healthz and a /generate are still served (uvicorn's limit_concurrency counted idle
    connections, so 8 sockets that send nothing made every request a 503 for up to --header-timeout)."""
    s = ServeProcess("--engine", tiny_onnx, "--max-connections", 16, "--limit-concurrency", 8,
                     "--header-timeout", 30)
    socks = []
    try:
        for count in (12, 40):   # > the in-flight cap; then > --max-connections
            socks += [raw(s.port, b"") for _ in range(count - len(socks))]
            time.sleep(0.3)
            h = httpx.get(s.url + "/healthz", timeout=10)
            assert h.status_code == 200, (count, h.status_code, h.text)
            r = generate(s.url, timeout=30, n=2, seed=count, sampler="ddim", steps=5, format="npy")
            np.testing.assert_allclose(npy(r), pipe.sample(2, seed=count, sampler="ddim", steps=5, output="float"),
                                       rtol=0, atol=SERVE_BATCHING_X0_ATOL)
        assert "Traceback" not in s.output(), s.output()[-3000:]
    finally:
        for x in socks:
            x.close()
        s.close()


def from_address(address: str, port: int) -> socket.socket:
    """A connection from another loopback address (all of 127.0.0.0/8 is this machine): another client."""
    x = socket.socket()
    x.settimeout(5)
    x.bind((address, 0))
    x.connect(("127.0.0.1", port))
    return x


def test_one_client_cannot_take_every_socket(tiny_onnx):
    """--max-connections-per-client 4: a fifth idle socket from 127.0.0.2 closes its own oldest one, never another
    client's; with four requests of its own in flight, its next connection is answered 503 while 127.0.0.1's
    requests and health checks are served."""
    s = ServeProcess("--engine", tiny_onnx, "--max-connections-per-client", 4, "--limit-concurrency", 8,
                     "--max-n", MAX_N, "--max-batch", 1, "--drain-timeout", 0.5, "--header-timeout", 30)
    theirs, ours, longs = [], [], []
    try:
        ours = [raw(s.port, b"") for _ in range(3)]
        theirs = [from_address("127.0.0.2", s.port) for _ in range(10)]
        assert wait_for(lambda: s.health()["connections_evicted_idle"] >= 6, 10)
        closed = [closed_by_server(x, 0.2) for x in theirs]
        assert closed == [True] * 6 + [False] * 4, closed
        assert not any(closed_by_server(x, 0.2) for x in ours)
        for x in theirs:
            x.close()
        # four long requests from 127.0.0.2 (busy connections are never closed to make room)
        transport = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(transport=transport, timeout=60) as client:
            body = dict(n=MAX_N, sampler="ddpm", format="npy")
            longs = [threading.Thread(target=lambda: client.post(s.url + "/generate", json=body))
                     for _ in range(4)]
            for t in longs:
                t.start()
            assert wait_for(lambda: s.health()["in_flight"] == 4, 10), s.health()
            x = from_address("127.0.0.2", s.port)
            x.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = x.recv(4096)
            x.close()
            assert reply.startswith(b"HTTP/1.1 503") and b"from 127.0.0.2" in reply, reply
            assert httpx.get(s.url + "/healthz", timeout=10).status_code == 200
            assert generate(s.url, timeout=30, n=1, sampler="ddim", steps=2).status_code == 200
            assert s.health()["connections_refused_per_client"] == 1
            s.close()
    finally:
        for x in theirs + ours:
            x.close()
        s.close()
        for t in longs:
            t.join(10)


def test_requests_in_flight_are_capped_and_healthz_is_never_refused(tiny_onnx):
    """--limit-concurrency 2: a third POST /generate is refused 503 at once while two run; /healthz and /info
    are served throughout."""
    s = ServeProcess("--engine", tiny_onnx, "--limit-concurrency", 2, "--max-n", MAX_N, "--max-batch", 1,
                     "--drain-timeout", 0.5)
    longs = []
    try:
        longs = [threading.Thread(target=lambda i=i: generate(s.url, timeout=60, n=MAX_N, seed=i, sampler="ddpm",
                                                              format="npy")) for i in range(2)]
        for t in longs:
            t.start()
        assert wait_for(lambda: s.health()["in_flight"] == 2, 10), s.health()
        t0 = time.time()
        r = generate(s.url, timeout=10, n=1, sampler="ddim", steps=2)
        assert r.status_code == 503 and "2 requests in flight (limit 2)" in r.json()["error"], r.text
        assert time.time() - t0 < 5     # at once: the two running requests take ~20 s
        for _ in range(5):
            assert httpx.get(s.url + "/healthz", timeout=5).status_code == 200
        assert httpx.get(s.url + "/info", timeout=5).status_code == 200
        assert s.health()["refused_in_flight"] == 1
    finally:
        s.close()
        for t in longs:
            t.join(10)


# -- item 15: one log line, 400/422 not 500, a drain deadline, no host paths ------------------------------------------

def test_client_gone_mid_body_is_one_log_line(tiny_onnx):
    s = ServeProcess("--engine", tiny_onnx)
    try:
        for _ in range(3):
            raw(s.port, post_head(1000) + b'{"n": 1, ').close()
        assert wait_for(lambda: s.output().count("disconnected") >= 3, 5), s.output()[-3000:]
        out = s.output()
        assert "Traceback" not in out and "ClientDisconnect" not in out, out[-3000:]
        lines = [ln for ln in out.splitlines() if "disconnected" in ln]
        assert len(lines) == 3, lines
        assert generate(s.url, n=1, steps=5, sampler="ddim").status_code == 200
    finally:
        s.close()


def test_deeply_nested_json_is_400(server):
    for body in (b"[" * 5000, b'{"n": ' + b"[" * 5000):
        r = httpx.post(server.url + "/generate", content=body, headers={"content-type": "application/json"},
                       timeout=30)
        assert r.status_code == 400, (r.status_code, r.text)
        assert "nested" in r.json()["error"] and "\n" not in r.json()["error"]
    assert "RecursionError" not in server.output()


ETAS = [(1e308, False), (1.5, False), (-0.5, False), (float("inf"), False), (0.0, True), (0.5, True), (1.0, True)]


@pytest.mark.parametrize("eta,ok", ETAS)
def test_eta_range_is_the_same_for_http_and_cli(server, tiny_onnx, tmp_path, eta, ok):
    body = json.dumps({"n": 1, "sampler": "ddim", "steps": 5, "eta": eta, "format": "npy"})
    r = httpx.post(server.url + "/generate", content=body.encode(), timeout=30)
    c = cli("run", "--engine", tiny_onnx, "--backend", "onnxruntime", "-n", 1, "--sampler", "ddim", "--steps", 5,
            "--eta", eta, "-o", tmp_path / "g.png", "--quiet")
    if ok:
        assert r.status_code == 200 and c.returncode == 0, (r.text, c.stderr)
    else:
        assert r.status_code == 422, (r.status_code, r.text)
        assert "eta must be" in r.json()["error"] and "between 0 and 1" in r.json()["error"], r.json()
        assert_one_line_error(c, "eta", "between 0 and 1")


def test_eta_with_a_sampler_that_has_none_is_422_as_in_the_cli(server):
    r = generate(server.url, n=1, sampler="ddpm", steps=5, eta=0.5)
    assert r.status_code == 422 and "ddim only" in r.json()["error"], r.text


def test_info_reveals_no_host_path(server, tiny_onnx):
    from ddpm_deploy.artifact.manifest import Manifest

    info = httpx.get(server.url + "/info", timeout=5).json()
    source = Manifest.read(tiny_onnx).source
    assert os.path.isabs(source)                      # the file records where it was exported from ...
    assert info["source"]["name"] == os.path.basename(source)      # ... /info names the file only

    def strings(v):
        if isinstance(v, dict):
            return [s for x in v.values() for s in strings(x)]
        if isinstance(v, list):
            return [s for x in v for s in strings(x)]
        return [v] if isinstance(v, str) else []

    folder = os.path.dirname(source)
    assert not [v for v in strings(info) if os.path.isabs(v) or folder in v], info


def test_sigterm_with_long_requests_open_exits_within_the_drain_deadline(tiny_onnx):
    """Four n=64 DDPM-50 requests at --max-batch 1 (12800 engine calls, ~20 s): SIGTERM answers them 503 after the
    1 s drain deadline and the process exits (it waited for all of them before)."""
    s = ServeProcess("--engine", tiny_onnx, "--max-n", MAX_N, "--max-batch", 1, "--drain-timeout", 1)
    results = []
    clients = [threading.Thread(target=lambda i=i: results.append(generate(
        s.url, timeout=60, n=MAX_N, seed=i, sampler="ddpm", format="npy"))) for i in range(4)]
    try:
        for t in clients:
            t.start()
        assert wait_for(lambda: s.health()["live_requests"] == 4, 20)
        t0 = time.time()
        os.killpg(s.proc.pid, signal.SIGTERM)
        try:
            s.proc.wait(8)
        except Exception:  # noqa: BLE001 - still running: the failure below
            pass
        took = time.time() - t0
        assert s.proc.poll() is not None, "the server did not exit 8 s after SIGTERM"
        assert took < 6, took
        for t in clients:
            t.join(10)
        assert len(results) == 4 and all(r.status_code == 503 for r in results), [r.status_code for r in results]
        assert all("shutting down" in r.json()["error"] for r in results)
        assert "Traceback" not in s.output(), s.output()[-3000:]
    finally:
        s.close()


def test_load_benchmark_abuse_mix_runs_and_loses_nothing(tiny_onnx, tmp_path):
    """benchmarks/load_serve.py --abuse with short settings on the tiny model: nothing lost, hostile bodies refused
    with their reason, every abandoned request cancelled by the server, every slow socket closed."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "load_serve.py"
    out = tmp_path / "abuse.json"
    r = subprocess.run([sys.executable, str(script), "--abuse", "--engine", tiny_onnx, "--max-batch", "4",
                        "--clients", "2", "--requests", "4", "--long-steps", "10", "--abandon", "2", "--slow", "3",
                        "--hostile", "1", "--header-timeout", "1", "--body-timeout", "1", "--idle", "20",
                        "--idle-addresses", "2", "--json", str(out)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads(out.read_text())["modes"]["step"]
    assert m["lost"] == 0 and m["served"] == 5 and m["abandoned"] == 2 and m["server"]["cancelled"] == 2, m
    assert sum(m["refused"].values()) == 3 and not [k for k in m["refused"] if k.startswith("500")], m
    assert m["slow"] == {"closed: HTTP/1.1 408 Request Timeout": 6}, m
    assert np.isfinite(m["short_p99_s"])
    assert m["idle"]["opened"] >= 20 and m["healthz"]["ok"] >= 1 and m["healthz"]["failed"] == 0, m
