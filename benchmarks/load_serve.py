"""Bounded load test of `ddpm-deploy serve`: step-level batching vs one request at a time, and an abuse mix.

For each mode a real server process on 127.0.0.1 (a free port) serves the shipped `digits` model (exported to ONNX
first); C concurrent clients (httpx, asyncio) send a fixed list of R requests with mixed samplers, step counts and
sizes (the same list, in the same order, for both modes and every backend of --backends). Reported per backend and
mode: throughput (images/s over the wall time of the R requests), p50/p99 request latency, engine calls (and per
image), and lost/failed requests (must be 0).

    .venv/bin/python benchmarks/load_serve.py --clients 8 --requests 64 --json load_serve.json
    .venv/bin/python benchmarks/load_serve.py --backends onnxruntime,openvino:bf16 --requests 32

`--abuse` runs the abuse mix instead (issue 21), against a server with short timeouts: one long request (n=64,
DDPM --long-steps) is started first; then, all at once, C clients send R short requests (n 1-2, DDIM 5 steps),
--abandon clients post n=64 requests and hang up after 0.2 s, --hostile clients per hostile body (5000 nested
`[`, eta 1e308, n 100000) post it, --slow connections send half a request head and --slow more half a body and then
stall. Reported: served (200), refused with a reason (status and the error's
words), abandoned (by design; the server's `cancelled` counter must match), lost (no answer, a reset, or a slow
socket the server never closed: must be 0), and the p50/p99 latency of the short requests behind the long one.

    .venv/bin/python benchmarks/load_serve.py --abuse --clients 8 --requests 32 --json load_abuse.json

`--idle N` adds, for the whole abuse mix, N sockets that never send a byte, spread over --idle-addresses loopback
addresses (127.0.0.2, ...: one client each), each reopened 75 ms after the server closes it (the reconnecting
client that kept a server with uvicorn's limit_concurrency answering 503 to everyone), and a health probe: a
fresh connection's GET /healthz every 100 ms. Reported: sockets opened and closed by the server, and health
probes answered 200 / not (every failed probe counts as lost).

Requests are bounded (R in all), the server is stopped at the end; nothing listens beyond loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ddpm_deploy.serve.process import ServeProcess

MODES = ("step", "request")


def export_digits(workdir: Path, max_batch: int) -> Path:
    path = workdir / "digits.onnx"
    if not path.exists():
        r = subprocess.run([sys.executable, "-m", "ddpm_deploy.cli", "export", "digits", "-o", str(path),
                            "--max-batch", str(max_batch)], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"export failed: {r.stderr.strip()}")
    return path


def request_mix(count: int, seed: int, max_n: int) -> list[dict]:
    """Mixed requests: DDIM 10/20/50 steps (eta 0 or 1) and strided DDPM 25 steps, 1..max_n images."""
    rng = random.Random(seed)
    kinds = [("ddim", 10, 0.0), ("ddim", 20, 0.0), ("ddim", 50, 0.0), ("ddim", 20, 1.0), ("ddpm", 25, 0.0)]
    out = []
    for i in range(count):
        sampler, steps, eta = rng.choice(kinds)
        out.append({"n": rng.randint(1, max_n), "seed": i, "sampler": sampler, "steps": steps, "eta": eta,
                    "format": "npy"})
    return out


async def drive(url: str, requests: list[dict], clients: int, timeout: float) -> dict:
    """C workers take requests from one queue in order; each records (latency, ok)."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for i, body in enumerate(requests):
        queue.put_nowait((i, body))
    results: dict[int, tuple] = {}

    async def worker(client):
        while True:
            try:
                i, body = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            try:
                r = await client.post(url + "/generate", json=body, timeout=timeout)
                ok = r.status_code == 200 and np.load(io.BytesIO(r.content)).shape[0] == body["n"]
                err = None if ok else f"{r.status_code} {r.text[:100]}"
            except Exception as e:  # noqa: BLE001 - counted as failed
                ok, err = False, f"{type(e).__name__}: {e}"
            results[i] = (time.perf_counter() - t0, ok, err)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = np.array([results[i][0] for i in sorted(results)])
    ok = [i for i in results if results[i][1]]
    images = sum(requests[i]["n"] for i in ok)
    return {"wall_s": wall, "requests": len(requests), "ok": len(ok), "failed": len(results) - len(ok),
            "lost": len(requests) - len(results), "images": images, "images_per_s": images / wall,
            "p50_latency_s": float(np.percentile(lat, 50)), "p99_latency_s": float(np.percentile(lat, 99)),
            "errors": sorted({results[i][2] for i in results if not results[i][1]})[:5]}


SLOW_HEAD = b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
SLOW_BODY = (b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
             b"Content-Length: 200\r\n\r\n{\"n\": 1, ")


# bodies a hostile client sends: each must be refused in one line (400/422), never a 500
HOSTILE = (b"[" * 5000, b'{"n": 1, "sampler": "ddim", "eta": 1e308}', b'{"n": 100000}')


def reason(status: int, text: str) -> str:
    """A refusal's bucket: status and the first words of its one-line error."""
    try:
        words = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        words = text
    words = " ".join(words.split()[:4]).rstrip(":,")
    return f"{status} {words}"


async def slow_socket(port: int, data: bytes, patience: float) -> str:
    """Open a connection, send `data` (an unfinished request) and stall; what the server did within `patience`:
    'closed: <status line>' or 'open' (lost: the server kept an abusive connection)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        got = await asyncio.wait_for(reader.read(), patience)    # until EOF: the server closed it
        status = got.split(b"\r\n", 1)[0].decode(errors="replace") if got else "no response"
        return f"closed: {status}"
    except asyncio.TimeoutError:
        return "open"
    except ConnectionError:
        return "closed: reset"
    finally:
        writer.close()


async def idle_flood(port: int, count: int, addresses: list[str], stop: asyncio.Event) -> dict:
    """`count` sockets that send nothing, from `addresses` in turn, each reopened 75 ms after the server closes it,
    until `stop`."""
    seen = {"opened": 0, "closed_by_server": 0}

    async def one(address: str):
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(address, 0))
            except OSError:
                await asyncio.sleep(0.075)
                continue
            seen["opened"] += 1
            eof, stopped = asyncio.ensure_future(reader.read()), asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({eof, stopped}, return_when=asyncio.FIRST_COMPLETED)
            seen["closed_by_server"] += eof in done
            eof.cancel()
            stopped.cancel()
            writer.close()
            await asyncio.sleep(0.075)

    await asyncio.gather(*(one(addresses[i % len(addresses)]) for i in range(count)))
    return seen


async def health_probe(url: str, stop: asyncio.Event) -> dict:
    """GET /healthz on a fresh connection every 100 ms until `stop`: how many were answered 200, and the slowest."""
    import httpx

    seen = {"ok": 0, "failed": 0, "failures": {}, "slowest_s": 0.0}
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            async with httpx.AsyncClient() as client:
                r = await client.get(url + "/healthz", timeout=5)
            what = "200" if r.status_code == 200 else reason(r.status_code, r.text)
        except httpx.HTTPError as e:
            what = type(e).__name__
        seen["slowest_s"] = max(seen["slowest_s"], time.perf_counter() - t0)
        if what == "200":
            seen["ok"] += 1
        else:
            seen["failed"] += 1
            seen["failures"][what] = seen["failures"].get(what, 0) + 1
        await asyncio.sleep(0.1)
    return seen


async def drive_abuse(url: str, port: int, args) -> dict:
    """The abuse mix (module docstring); every client is bounded in count and time."""
    import httpx

    out: dict = {"served": 0, "refused": {}, "abandoned": 0, "lost": 0, "lost_detail": [], "slow": {}}

    async def post(client, body, timeout, tag):
        t0 = time.perf_counter()
        try:
            if isinstance(body, bytes):    # a hostile body, sent as is
                r = await client.post(url + "/generate", content=body, timeout=timeout,
                                      headers={"content-type": "application/json"})
            else:
                r = await client.post(url + "/generate", json=body, timeout=timeout)
        except httpx.TimeoutException:
            if tag == "abandon":          # hanging up is this client's whole point
                out["abandoned"] += 1
            else:
                out["lost"] += 1
                out["lost_detail"].append(f"{tag}: timeout")
            return None
        except httpx.HTTPError as e:
            out["lost"] += 1
            out["lost_detail"].append(f"{tag}: {type(e).__name__}: {e}")
            return None
        seconds = time.perf_counter() - t0
        if r.status_code == 200:
            out["served"] += 1
            return seconds
        key = reason(r.status_code, r.text)
        out["refused"][key] = out["refused"].get(key, 0) + 1
        return None

    limits = httpx.Limits(max_connections=args.clients + args.abandon + 2)
    async with httpx.AsyncClient(limits=limits) as client:
        long_body = {"n": 64, "seed": 0, "sampler": "ddpm", "steps": args.long_steps, "format": "npy"}
        t_long = time.perf_counter()
        long_task = asyncio.create_task(post(client, long_body, args.timeout, "long"))
        for _ in range(200):                                     # the long request is running before the rest come
            h = (await client.get(url + "/healthz", timeout=10)).json()
            if h["engine_calls"] > 0 and h["live_requests"] > 0:
                break
            await asyncio.sleep(0.05)
        shorts = [{"n": 1 + i % 2, "seed": 1000 + i, "sampler": "ddim", "steps": 5, "format": "npy"}
                  for i in range(args.requests)]
        queue: asyncio.Queue = asyncio.Queue()
        for body in shorts:
            queue.put_nowait(body)
        short_lat: list[float] = []

        async def short_worker():
            while not queue.empty():
                seconds = await post(client, queue.get_nowait(), args.timeout, "short")
                if seconds is not None:
                    short_lat.append(seconds)

        abandoners = [post(client, {"n": 64, "seed": 2000 + i, "sampler": "ddpm", "steps": args.long_steps,
                                    "format": "npy"}, 0.2, "abandon") for i in range(args.abandon)]
        hostile = [post(client, body, args.timeout, "hostile") for body in HOSTILE for _ in range(args.hostile)]
        patience = args.header_timeout + args.body_timeout + 5
        slow = [slow_socket(port, SLOW_HEAD, patience) for _ in range(args.slow)] + \
               [slow_socket(port, SLOW_BODY, patience) for _ in range(args.slow)]
        stop = asyncio.Event()
        addresses = [f"127.0.0.{2 + i}" for i in range(args.idle_addresses)]
        flood = asyncio.ensure_future(idle_flood(port, args.idle, addresses, stop)) if args.idle else None
        probe = asyncio.ensure_future(health_probe(url, stop)) if args.idle else None
        t0 = time.perf_counter()
        results = await asyncio.gather(*(short_worker() for _ in range(args.clients)), *abandoners, *hostile,
                                       *slow)
        shorts_wall = time.perf_counter() - t0
        if flood is not None:
            stop.set()
            out["idle"], out["healthz"] = await flood, await probe
            out["lost"] += out["healthz"]["failed"]
        long_s = await long_task
        for state in results[args.clients + args.abandon + len(hostile):]:
            out["slow"][state] = out["slow"].get(state, 0) + 1
            if state == "open":
                out["lost"] += 1
        out["lost_detail"] = out["lost_detail"][:5]
        h = (await client.get(url + "/healthz", timeout=10)).json()
    lat = np.array(short_lat) if short_lat else np.array([np.nan])
    out.update({"short_requests": len(shorts), "short_served": len(short_lat), "shorts_wall_s": shorts_wall,
                "short_p50_s": float(np.percentile(lat, 50)), "short_p99_s": float(np.percentile(lat, 99)),
                "long_s": long_s, "long_wall_s": time.perf_counter() - t_long,
                "server": {k: h.get(k, 0) for k in ("cancelled", "completed", "failed", "refused_busy",
                                                     "header_timeouts", "connections_refused", "http_408",
                                                     "disconnected_mid_body", "engine_calls", "refused_in_flight",
                                                     "connections_evicted_idle",
                                                     "connections_refused_per_client")}})
    return out


def run_abuse(engine: Path, args) -> dict:
    report = {"engine": str(engine), "clients": args.clients, "short_requests": args.requests, "idle": args.idle,
              "idle_addresses": args.idle_addresses,
              "abandon": args.abandon, "hostile_each": args.hostile, "slow_each": args.slow, "long_steps": args.long_steps,
              "max_batch": args.max_batch, "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(), "modes": {}}
    for mode in args.abuse_modes.split(","):
        threads = ("--threads", args.threads) if args.threads else ()
        server = ServeProcess("--engine", engine, "--batching", mode, "--max-batch", args.max_batch, *threads,
                              "--header-timeout", args.header_timeout, "--body-timeout", args.body_timeout,
                              startup_s=120)
        try:
            asyncio.run(drive(server.url, request_mix(2, 0, 2), 2, args.timeout))          # warm-up, not counted
            r = asyncio.run(drive_abuse(server.url, server.port, args))
        finally:
            server.close()
        r["abandoned_matches_server"] = r["server"]["cancelled"] == r["abandoned"]
        report["modes"][mode] = r
        refused = ", ".join(f"{k}: {v}" for k, v in sorted(r["refused"].items())) or "none"
        slow = ", ".join(f"{k}: {v}" for k, v in sorted(r["slow"].items()))
        print(f"{mode:8s} served {r['served']}  refused [{refused}]  abandoned {r['abandoned']} (server cancelled "
              f"{r['server']['cancelled']})  lost {r['lost']}\n         slow sockets [{slow}]\n         short "
              f"requests ({r['short_served']}/{r['short_requests']} served) p50 {r['short_p50_s']:.3f}s  p99 "
              f"{r['short_p99_s']:.3f}s behind the long request (n=64, DDPM {args.long_steps} steps, "
              f"{r['long_s'] if r['long_s'] is None else round(r['long_s'], 2)}s)", flush=True)
        if "idle" in r:
            hz = r["healthz"]
            print(f"         idle sockets: {r['idle']['opened']} opened, {r['idle']['closed_by_server']} closed by "
                  f"the server (evicted idle {r['server']['connections_evicted_idle']}); /healthz {hz['ok']} ok, "
                  f"{hz['failed']} failed {hz['failures'] or ''} (slowest {hz['slowest_s']:.3f}s)", flush=True)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", default=None, help="An exported .onnx (default: export the shipped digits model).")
    ap.add_argument("--workdir", default=None, help="Where the digits export goes (default: a temp folder).")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-n", type=int, default=4, help="Images per request drawn from 1..max-n.")
    ap.add_argument("--max-batch", type=int, default=16, help="Rows per engine call (server --max-batch).")
    ap.add_argument("--threads", type=int, default=None, help="Server runtime threads.")
    ap.add_argument("--backends", default="default", help="Comma-separated server backends NAME[:PRECISION] "
                    "(e.g. onnxruntime,openvino:bf16), each under the same mix; default: the server's own choice.")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the request mix.")
    ap.add_argument("--timeout", type=float, default=300.0, help="Per-request client timeout (s).")
    ap.add_argument("--json", default=None, help="Write the report here.")
    ap.add_argument("--abuse", action="store_true", help="Run the abuse mix (module docstring) instead.")
    ap.add_argument("--abuse-modes", default="step", help="--abuse: server --batching modes, comma-separated.")
    ap.add_argument("--abandon", type=int, default=16, help="--abuse: clients that post n=64 and hang up.")
    ap.add_argument("--slow", type=int, default=50, help="--abuse: slow-head and (as many) slow-body sockets.")
    ap.add_argument("--hostile", type=int, default=2, help="--abuse: clients per hostile body (HOSTILE).")
    ap.add_argument("--long-steps", type=int, default=200, help="--abuse: DDPM steps of the long n=64 request.")
    ap.add_argument("--header-timeout", type=float, default=2.0, help="--abuse: server --header-timeout.")
    ap.add_argument("--body-timeout", type=float, default=2.0, help="--abuse: server --body-timeout.")
    ap.add_argument("--idle", type=int, default=0, help="--abuse: sockets that send nothing, reopened when closed "
                    "(module docstring), with a /healthz probe.")
    ap.add_argument("--idle-addresses", type=int, default=4, help="--abuse --idle: loopback client addresses.")
    args = ap.parse_args()
    if min(args.clients, args.requests, args.max_n, args.max_batch, args.long_steps) <= 0 or \
            min(args.abandon, args.slow, args.hostile) < 0:
        raise SystemExit("--clients, --requests, --max-n, --max-batch and --long-steps must be positive")

    with tempfile.TemporaryDirectory(prefix="ddpm_load_") as tmp:
        engine = Path(args.engine) if args.engine else export_digits(Path(args.workdir or tmp), args.max_batch)
        if args.abuse:
            report = run_abuse(engine, args)
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=2))
            if any(m["lost"] or not m["abandoned_matches_server"] or any(k.startswith("500") for k in m["refused"])
                   for m in report["modes"].values()):
                raise SystemExit("lost requests/connections, a 500, or abandoned requests the server did not cancel")
            return
        requests = request_mix(args.requests, args.seed, args.max_n)
        report = {"engine": str(engine), "clients": args.clients, "requests": args.requests, "max_n": args.max_n,
                  "max_batch": args.max_batch, "cpu_count": os.cpu_count(), "load_before": os.getloadavg(),
                  "backends": {}}
        for spec in args.backends.split(","):
            report["backends"][spec] = {mode: serve_mix(engine, spec, mode, requests, args) for mode in MODES}
        report["load_after"] = os.getloadavg()
    for spec, modes in report["backends"].items():
        s, r = modes["step"], modes["request"]
        modes["speedup_images_per_s"] = s["images_per_s"] / r["images_per_s"]
        print(f"{spec}: step-level batching {modes['speedup_images_per_s']:.2f}x the throughput of one request at a "
              "time")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if any(m["failed"] or m["lost"] for modes in report["backends"].values() for k, m in modes.items()
           if k in MODES):
        raise SystemExit("lost or failed requests")


def serve_mix(engine: Path, spec: str, mode: str, requests: list[dict], args) -> dict:
    """One server (backend NAME[:PRECISION] or "default", batching `mode`) under the request mix: the report row."""
    name, _, precision = spec.partition(":")
    flags = [*(("--backend", name) if name != "default" else ()), *(("--precision", precision) if precision else ()),
             *(("--threads", args.threads) if args.threads else ())]
    server = ServeProcess("--engine", engine, "--batching", mode, "--max-batch", args.max_batch, *flags,
                          startup_s=300)
    try:
        asyncio.run(drive(server.url, requests[:2], 2, args.timeout))          # warm-up, not counted
        before = server.health()
        result = asyncio.run(drive(server.url, requests, args.clients, args.timeout))
        after = server.health()
    finally:
        server.close()
    result["engine_calls"] = after["engine_calls"] - before["engine_calls"]
    result["engine_calls_per_image"] = result["engine_calls"] / max(result["images"], 1)
    print(f"{spec:18s} {mode:8s} {result['images_per_s']:7.1f} images/s  p50 {result['p50_latency_s']:6.2f}s  "
          f"p99 {result['p99_latency_s']:6.2f}s  engine calls {result['engine_calls']:5d} "
          f"({result['engine_calls_per_image']:.2f}/image)  ok {result['ok']}/{result['requests']}  "
          f"failed {result['failed']}  lost {result['lost']}", flush=True)
    return result


if __name__ == "__main__":
    main()
