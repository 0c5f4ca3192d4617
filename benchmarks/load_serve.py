"""Bounded load test of `ddpm-deploy serve`: step-level batching vs one request at a time.

For each mode a real server process on 127.0.0.1 (a free port) serves the shipped `digits` model (exported to ONNX
first); C concurrent clients (httpx, asyncio) send a fixed list of R requests with mixed samplers, step counts and
sizes (the same list, in the same order, for both modes). Reported per mode: throughput (images/s over the wall
time of the R requests), p50/p99 request latency, engine calls, and lost/failed requests (must be 0).

    .venv/bin/python benchmarks/load_serve.py --clients 8 --requests 64 --json load_serve.json

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", default=None, help="An exported .onnx (default: export the shipped digits model).")
    ap.add_argument("--workdir", default=None, help="Where the digits export goes (default: a temp folder).")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-n", type=int, default=4, help="Images per request drawn from 1..max-n.")
    ap.add_argument("--max-batch", type=int, default=16, help="Rows per engine call (server --max-batch).")
    ap.add_argument("--threads", type=int, default=None, help="Server runtime threads.")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the request mix.")
    ap.add_argument("--timeout", type=float, default=300.0, help="Per-request client timeout (s).")
    ap.add_argument("--json", default=None, help="Write the report here.")
    args = ap.parse_args()
    if min(args.clients, args.requests, args.max_n, args.max_batch) <= 0:
        raise SystemExit("--clients, --requests, --max-n and --max-batch must be positive")

    with tempfile.TemporaryDirectory(prefix="ddpm_load_") as tmp:
        engine = Path(args.engine) if args.engine else export_digits(Path(args.workdir or tmp), args.max_batch)
        requests = request_mix(args.requests, args.seed, args.max_n)
        report = {"engine": str(engine), "clients": args.clients, "requests": args.requests, "max_n": args.max_n,
                  "max_batch": args.max_batch, "cpu_count": os.cpu_count(), "modes": {}}
        for mode in MODES:
            threads = ("--threads", args.threads) if args.threads else ()
            server = ServeProcess("--engine", engine, "--batching", mode, "--max-batch", args.max_batch, *threads,
                                  startup_s=120)
            try:
                asyncio.run(drive(server.url, requests[:2], 2, args.timeout))          # warm-up, not counted
                before = server.health()
                result = asyncio.run(drive(server.url, requests, args.clients, args.timeout))
                after = server.health()
            finally:
                server.close()
            result["engine_calls"] = after["engine_calls"] - before["engine_calls"]
            report["modes"][mode] = result
            print(f"{mode:8s} {result['images_per_s']:7.1f} images/s  p50 {result['p50_latency_s']:6.2f}s  "
                  f"p99 {result['p99_latency_s']:6.2f}s  engine calls {result['engine_calls']:5d}  "
                  f"ok {result['ok']}/{result['requests']}  failed {result['failed']}  lost {result['lost']}",
                  flush=True)
    s, r = report["modes"]["step"], report["modes"]["request"]
    report["speedup_images_per_s"] = s["images_per_s"] / r["images_per_s"]
    print(f"step-level batching: {report['speedup_images_per_s']:.2f}x the throughput of one request at a time")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if any(m["failed"] or m["lost"] for m in report["modes"].values()):
        raise SystemExit("lost or failed requests")


if __name__ == "__main__":
    main()
