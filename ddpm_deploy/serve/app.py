"""The HTTP API (FastAPI), the same app embedded under uvicorn or inside a Ray Serve replica.

    POST /generate {"n": 4, "seed": 0, "sampler": "ddim", "steps": 50, "eta": 0.0, "format": "png" | "npy"}
         -> 200 application/zip (one PNG per image, 00000.png ...) or application/x-npy (float32 x_0 (n, C, H, W))
    GET  /healthz -> {"status": "ok", active/queued rows, counters}
    GET  /info    -> the model's manifest

Errors are {"error": "<one line>"}: 400 malformed JSON, 413 body too large, 422 bad field, 503 queue full,
500 the backend failed for this request (e.g. non-finite eps); the server keeps serving after each.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Callable

from fastapi import FastAPI, Request   # module level: FastAPI reads the route annotations from these globals
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import NonFiniteError, UserError, first_line
from .batcher import BusyError
from .service import Service, ServeConfig, encode

POLL_DISCONNECT_S = 0.05   # how often a waiting request checks whether its client is still there


class _HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def create_app(get_service: Callable[[], Service]):
    """A FastAPI app whose routes ask `get_service()` for the process's Service (embedded: a closure; Ray Serve:
    the replica's own)."""
    app = FastAPI(title="ddpm-deploy", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": first_line(message)}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # 404 / 405 in the same one-line shape
        return error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")

    @app.get("/healthz")
    async def healthz():
        return get_service().health()

    @app.get("/info")
    async def info():
        return get_service().info()

    @app.post("/generate")
    async def generate(request: Request):
        service = get_service()
        try:
            body = await _read_body(request, service.config.max_body)
            req = service.parse(_json(body))
            job = service.submit(req)
        except _HTTPError as e:
            return error(e.status, str(e))
        except UserError as e:
            return error(422, str(e))
        except BusyError as e:
            return error(503, str(e))
        try:
            x0 = await _wait(job, request, service)
        except (NonFiniteError, RuntimeError) as e:
            return error(500, str(e))
        except _ClientGone:   # nobody reads this; 499 as nginx logs it
            return Response(status_code=499)
        except asyncio.CancelledError:   # client gone (Ray Serve cancels the handler; uvicorn: see _wait)
            service.batcher.cancel(job)
            raise
        finally:
            if not job.future.done():
                service.batcher.cancel(job)
        content, media = await asyncio.to_thread(encode, x0, req.format)
        seconds = time.perf_counter() - job.submitted
        return Response(content, media_type=media, headers={
            "X-Images": str(req.n), "X-Steps": str(job.plan.steps), "X-Seconds": f"{seconds:.4f}"})

    return app


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _HTTPError(413, f"request body of {declared} bytes is over the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():   # chunked bodies have no length: count as they arrive
        size += len(chunk)
        if size > limit:
            raise _HTTPError(413, f"request body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _json(body: bytes):
    if not body:
        raise _HTTPError(400, "empty body: send a JSON object like {\"n\": 4, \"seed\": 0}")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise _HTTPError(400, f"malformed JSON body: {first_line(e)}") from None


class _ClientGone(Exception):
    pass


async def _wait(job, request, service: Service):
    """The job's x_0; cancels the job (its rows leave at the next step) as soon as the client disconnects."""
    fut = asyncio.wrap_future(job.future)
    while True:
        done, _ = await asyncio.wait({fut}, timeout=POLL_DISCONNECT_S)
        if done:
            return fut.result()
        if await request.is_disconnected():
            service.batcher.cancel(job)
            raise _ClientGone()


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port or --host") \
                from None


def run_embedded(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, echo=print) -> None:
    """Serve in this process with uvicorn until interrupted."""
    import uvicorn

    if not 0 <= port <= 65535:
        raise UserError(f"--port must be 0..65535, got {port}")
    check_port_free(host, port)
    service = Service(config)
    try:
        app = create_app(lambda: service)
        echo(f"serving {config.engine} on http://{host}:{port} (backend {service.pipe.backend.name}, "
             f"max batch {service.batcher.max_batch}, max n {config.max_n})")
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        service.close()
