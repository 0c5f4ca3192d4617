"""The HTTP API (FastAPI), the same app embedded under uvicorn or inside a Ray Serve replica.

    POST /generate {"n": 4, "seed": 0, "sampler": "ddim", "steps": 50, "eta": 0.0, "format": "png" | "npy"}
         (also "order", "variant", "spacing": the sampler fields are a SamplerSpec, checked as by run and the API)
         -> 200 application/zip (one PNG per image, 00000.png ...) or application/x-npy (float32 x_0 (n, C, H, W))
    GET  /healthz -> {"status": "ok", active/queued rows, counters}
    GET  /info    -> the model's manifest (the source checkpoint by file name only: no host paths)

Errors are {"error": "<one line>"}: 400 malformed or too deeply nested JSON, 408 body not received within
--body-timeout, 413 body too large, 422 bad field, 503 queue full / too many connections / shutting down, 500 the
backend failed for this request (e.g. non-finite eps); the server keeps serving after each.

Embedded (uvicorn, `run_embedded`), every connection is bounded in time and number: a request head must arrive
within --header-timeout (from connecting, or --keep-alive-timeout + --header-timeout after the previous response),
the body within --body-timeout; connections beyond --max-connections are answered 503 and closed at once, requests
beyond --limit-concurrency get uvicorn's 503. On SIGTERM the server stops accepting, lets open requests finish for
--drain-timeout seconds, then answers the rest 503 "server shutting down" and exits. A client that goes away
mid-body is one log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from typing import Callable

from fastapi import FastAPI, Request   # module level: FastAPI reads the route annotations from these globals
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import NonFiniteError, UserError, first_line
from .batcher import BusyError
from .service import Service, ServeConfig, encode

POLL_DISCONNECT_S = 0.05   # how often a waiting request checks whether its client is still there
MAX_HEAD_BYTES = 16 * 1024  # request line + headers (h11's incomplete-event limit); a /generate head is ~200 bytes
log = logging.getLogger("uvicorn.error")   # uvicorn's own error log: one line per event, its format


class _HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def create_app(get_service: Callable[[], Service]):
    """A FastAPI app whose routes ask `get_service()` for the process's Service (embedded: a closure; Ray Serve:
    the replica's own)."""
    app = FastAPI(title="ddpm-deploy", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str, close: bool = False) -> JSONResponse:
        headers = {"connection": "close"} if close else None   # e.g. a body left unread: do not reuse the socket
        return JSONResponse({"error": first_line(message)}, status_code=status, headers=headers)

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
            body = await _read_body(request, service.config.max_body, service.config.body_timeout)
            req = service.parse(_json(body))
            job = service.submit(req)
        except _HTTPError as e:
            service.counters[f"http_{e.status}"] += 1
            return error(e.status, str(e), close=e.status in (408, 413))
        except ClientDisconnect:   # one line, not uvicorn's traceback of the whole ASGI stack
            service.counters["disconnected_mid_body"] += 1
            client = request.client
            log.warning("client %s disconnected mid-body", f"{client.host}:{client.port}" if client else "?")
            return Response(status_code=499)
        except UserError as e:
            return error(422, str(e))
        except BusyError as e:
            return error(503, str(e))
        try:
            x0 = await _wait(job, request, service)
        except BusyError as e:          # the server is draining (SIGTERM): not this request's fault
            return error(503, str(e))
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
            "X-Images": str(req.n), "X-Steps": str(job.plan.steps), "X-Seconds": f"{seconds:.4f}",
            "X-Engine-Calls": str(job.engine_calls)})

    return app


async def _read_body(request, limit: int, timeout: float) -> bytes:
    """The whole body within `timeout` seconds (a client trickling bytes holds a connection otherwise)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _HTTPError(413, f"request body of {declared} bytes is over the {limit}-byte limit")
    chunks = []

    async def receive() -> None:
        size = 0
        async for chunk in request.stream():   # chunked bodies have no length: count as they arrive
            size += len(chunk)
            if size > limit:
                raise _HTTPError(413, f"request body is over the {limit}-byte limit")
            chunks.append(chunk)

    try:
        # wait_for, not asyncio.timeout (Python 3.11+): the package supports 3.10; asyncio.TimeoutError is the
        # builtin TimeoutError only from 3.11 on
        await asyncio.wait_for(receive(), timeout)
    except asyncio.TimeoutError:
        size = sum(map(len, chunks))
        raise _HTTPError(408, f"request body not received within {timeout:g} s ({size} bytes came): send it "
                              "at once") from None
    return b"".join(chunks)


def _json(body: bytes):
    if not body:
        raise _HTTPError(400, "empty body: send a JSON object like {\"n\": 4, \"seed\": 0}")
    try:
        return json.loads(body)
    except RecursionError:
        raise _HTTPError(400, "JSON body nested too deeply: send a flat object like {\"n\": 4, \"seed\": 0}") \
            from None
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


def _raw_response(status: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


def guarded_h11(config: ServeConfig, counters):
    """uvicorn's h11 protocol with what it lacks (uvicorn 0.55 has no request-head timeout: a connection that
    never finishes its headers stays open forever): a cap on open connections, checked at accept, and a deadline
    for each request head. Events are counted in `counters` (the /healthz numbers), not logged one per socket."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    too_many = _raw_response("503 Service Unavailable",
                             f"too many connections (limit {config.max_connections}): retry later")
    too_slow = _raw_response("408 Request Timeout",
                             f"request head not received within {config.header_timeout:g} s")

    class GuardedH11(H11Protocol):
        _head_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            if len(self.connections) > config.max_connections:
                counters["connections_refused"] += 1
                transport.write(too_many)
                transport.close()
                return
            self._arm_head_timer(config.header_timeout)

        def handle_events(self):
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:   # a request head arrived: the body has its own deadline (in the app)
                self._disarm_head_timer()

        def on_response_complete(self):
            # the next request's head: keep-alive idle time, then header_timeout to send it (uvicorn's keep-alive
            # timer is cancelled by the first byte, so it alone does not bound a trickled head)
            self._arm_head_timer(config.keep_alive_timeout + config.header_timeout)
            super().on_response_complete()

        def connection_lost(self, exc):
            self._disarm_head_timer()
            super().connection_lost(exc)

        def _arm_head_timer(self, seconds: float):
            self._disarm_head_timer()
            self._head_timer = self.loop.call_later(seconds, self._head_timeout)

        def _disarm_head_timer(self):
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self):
            self._head_timer = None
            if not self.transport.is_closing():
                counters["header_timeouts"] += 1
                self.transport.write(too_slow)
                self.transport.close()

    return GuardedH11


def run_embedded(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, echo=print) -> None:
    """Serve in this process with uvicorn until interrupted (SIGINT / SIGTERM: drained, see the module docstring)."""
    import uvicorn

    if not 0 <= port <= 65535:
        raise UserError(f"--port must be 0..65535, got {port}")
    check_port_free(host, port)
    service = Service(config)

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            # uvicorn waits for open requests (forever by default); after the drain deadline the batcher fails
            # what is left, so each open request is answered 503 and its connection closes
            timer = asyncio.get_running_loop().call_later(config.drain_timeout, service.batcher.stop,
                                                          "server shutting down")
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    try:
        app = create_app(lambda: service)
        uv = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            http=guarded_h11(config, service.counters), h11_max_incomplete_event_size=MAX_HEAD_BYTES,
                            timeout_keep_alive=config.keep_alive_timeout, limit_concurrency=config.limit_concurrency,
                            # a backstop: anything still open this long after SIGTERM is cancelled
                            timeout_graceful_shutdown=config.drain_timeout + 5)
        echo(f"serving {config.engine} on http://{host}:{port} (backend {service.pipe.backend.name}, "
             f"max batch {service.batcher.max_batch}, max n {config.max_n})")
        DrainingServer(uv).run()
    finally:
        service.close()
