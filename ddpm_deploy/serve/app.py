"""The HTTP API (FastAPI), the same app embedded under uvicorn or inside a Ray Serve replica.

    POST /generate {"n": 4, "seed": 0, "sampler": "ddim", "steps": 50, "eta": 0.0, "format": "png" | "npy"}
         (also "order", "variant", "spacing": the sampler fields are a SamplerSpec, checked as by run and the API)
         -> 200 application/zip (one PNG per image, 00000.png ...) or application/x-npy (float32 x_0 (n, C, H, W))
    GET  /healthz -> {"status": "ok", active/queued rows, counters}
    GET  /info    -> the model's manifest (the source checkpoint by file name only: no host paths)

Errors are {"error": "<one line>"}: 400 malformed or too deeply nested JSON, 408 body not received within
--body-timeout, 413 body too large, 422 bad field, 503 queue full / too many connections / shutting down, 500 the
backend failed for this request (e.g. non-finite eps); the server keeps serving after each.

POST /generate requests in flight (from their head to their response) beyond --limit-concurrency are answered 503
at once; /healthz and /info are never refused for load. Embedded (uvicorn, `run_embedded`), every connection is
bounded in time and number: a request head must arrive within --header-timeout (from connecting, or
--keep-alive-timeout + --header-timeout after the previous response), the body within --body-timeout. A connection
beyond --max-connections-per-client (per remote address) or --max-connections closes an idle connection (no request
in flight: never sent a head, or kept alive between requests; the oldest of those that never sent one first) of that
client, or of all, to make room, and is answered 503 and closed only when none is idle. So sockets that send nothing
cannot lock anyone out: a new connection gets in while fewer requests than --max-connections are in flight (and
--max-connections must exceed --limit-concurrency). On SIGINT (Ctrl-C) or SIGTERM
the server stops accepting, lets open requests finish for --drain-timeout seconds, then answers the rest 503 "server
shutting down" and exits 0.

Logging (logger `ddpm_deploy.serve`, uvicorn's format): one line per request (client, request line, status, images,
engine calls, seconds, and a refusal's reason), like uvicorn's access log; one at shutdown, at the drain deadline and
at the stop; a client that goes away mid-body is one warning line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
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
LOG_LEVELS = ("debug", "info", "warning", "error")
log = logging.getLogger("ddpm_deploy.serve")   # access, drain and warning lines (run_embedded gives it a handler)


class _HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def create_app(get_service: Callable[[], Service]):
    """A FastAPI app whose routes ask `get_service()` for the process's Service (embedded: a closure; Ray Serve:
    the replica's own)."""
    app = FastAPI(title="ddpm-deploy", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(AccessLog)

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
        limit = service.config.limit_concurrency
        if service.in_flight >= limit:   # before the body is read: a refusal costs nothing
            service.counters["refused_in_flight"] += 1
            return error(503, f"server busy: {service.in_flight} requests in flight (limit {limit}); retry later",
                         close=True)
        service.in_flight += 1
        try:
            return await _generate(request, service)
        finally:
            service.in_flight -= 1

    async def _generate(request: Request, service: Service):
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


class AccessLog:
    """ASGI middleware: one log line per HTTP request once its response is sent (or the client left): client,
    request line, status, then for /generate its images and engine calls (the X- headers), the seconds from head to
    response, and for a refusal the first 160 characters of its one-line reason."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, seen = time.perf_counter(), {"status": None, "headers": {}, "body": b""}

        async def send_logged(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                seen["headers"] = {k.decode("latin-1").lower(): v.decode("latin-1")
                                   for k, v in message.get("headers", ())}
            elif message["type"] == "http.response.body" and (seen["status"] or 0) >= 400:
                seen["body"] += message.get("body", b"")[:4096]
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            line = access_line(scope, seen["status"], seen["headers"], seen["body"], time.perf_counter() - start)
            log.info("%s", printable(line))


def printable(text: str) -> str:
    """`text` with control characters escaped: a path (URL-decoded: %0A is a newline) or a field name a client sent
    must not start a line of its own in the log."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def access_line(scope, status: int | None, headers: dict, body: bytes, seconds: float) -> str:
    client = scope.get("client")
    who = f"{client[0]}:{client[1]}" if client else "-"
    path = scope.get("path", "") + (f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else "")
    line = f'{who} "{scope.get("method")} {path[:200]} HTTP/{scope.get("http_version", "1.1")}" {status or "-"}'
    if "x-images" in headers:
        line += f" images {headers['x-images']} engine-calls {headers.get('x-engine-calls', '-')}"
    line += f" {seconds:.3f} s"
    if body:
        try:
            line += f" ({first_line(str(json.loads(body)['error']), 160)})"
        except (ValueError, KeyError, TypeError):
            pass
    return line


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
    never finishes its headers stays open forever): caps on open connections, per remote address and in all, checked
    at accept, that close an idle connection to make room (the module docstring), and a deadline for each request
    head. Events are counted in `counters` (the /healthz numbers), not logged one per socket: a flood of sockets
    must not flood the log."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    too_many = _raw_response("503 Service Unavailable",
                             f"too many connections with requests in flight (limit {config.max_connections}): "
                             "retry later")
    too_slow = _raw_response("408 Request Timeout",
                             f"request head not received within {config.header_timeout:g} s")
    by_peer: dict[str, set] = {}   # remote address -> its open connections (those not being closed by us)

    class GuardedH11(H11Protocol):
        _head_timer = None
        _idle_since = None   # monotonic time since which no request is in flight on it; None: one is, or closing
        _peer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._peer = self.client[0] if self.client else ""
            mine = by_peer.setdefault(self._peer, set())
            mine.add(self)
            self._idle_since = time.monotonic()
            if len(mine) > config.max_connections_per_client and not self._evict_idle(mine):
                counters["connections_refused_per_client"] += 1
                return self._refuse(_raw_response(
                    "503 Service Unavailable", f"too many connections from {self._peer} with requests in flight "
                    f"(limit {config.max_connections_per_client} per client): retry later"))
            if len(self.connections) > config.max_connections and not self._evict_idle(self.connections):
                counters["connections_refused"] += 1
                return self._refuse(too_many)
            self._arm_head_timer(config.header_timeout)

        def handle_events(self):
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:   # a request head arrived: the body has its own deadline (in the app)
                self._idle_since = None
                self._disarm_head_timer()

        def on_response_complete(self):
            # the next request's head: keep-alive idle time, then header_timeout to send it (uvicorn's keep-alive
            # timer is cancelled by the first byte, so it alone does not bound a trickled head)
            if self._peer is not None and not self.transport.is_closing():
                self._idle_since = time.monotonic()
                self._arm_head_timer(config.keep_alive_timeout + config.header_timeout)
            super().on_response_complete()

        def connection_lost(self, exc):
            self._disarm_head_timer()
            self._forget()
            super().connection_lost(exc)

        def _evict_idle(self, pool) -> bool:
            """Close an idle connection of `pool` (not this one) to make room; False if none is idle. One that never
            sent a request goes first (a reconnecting flood's are always young: by age alone a real client's
            kept-alive connection, idle for milliseconds between its requests, would be the oldest), then the one
            idle the longest."""
            idle = [c for c in pool if c is not self and getattr(c, "_idle_since", None) is not None]
            if not idle:
                return False
            victim = min(idle, key=lambda c: (c.cycle is not None, c._idle_since))
            counters["connections_evicted_idle"] += 1
            victim._close()
            return True

        def _refuse(self, response: bytes) -> None:
            self.transport.write(response)
            self._close()

        def _close(self) -> None:
            self._disarm_head_timer()
            self._forget()
            self.transport.close()

        def _forget(self) -> None:
            """Out of the counts at once (connection_lost comes a loop turn later), and never evicted again."""
            self._idle_since = None
            self.connections.discard(self)
            peers = by_peer.get(self._peer)
            if peers is not None:
                peers.discard(self)
                if not peers:
                    del by_peer[self._peer]

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
                self._close()

    return GuardedH11


def configure_logging(level: str) -> None:
    """`ddpm_deploy.serve`'s lines on stderr in uvicorn's format ("INFO:     ..."), at `level` (LOG_LEVELS)."""
    from uvicorn.logging import DefaultFormatter

    if level not in LOG_LEVELS:
        raise UserError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


def run_embedded(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, echo=print,
                 log_level: str = "info") -> None:
    """Serve in this process with uvicorn until SIGINT / SIGTERM (drained, see the module docstring; a clean stop
    returns normally)."""
    import uvicorn

    if not 0 <= port <= 65535:
        raise UserError(f"--port must be 0..65535, got {port}")
    configure_logging(log_level)
    check_port_free(host, port)
    service = Service(config)

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            # uvicorn waits for open requests (forever by default); after the drain deadline the batcher fails
            # what is left, so each open request is answered 503 and its connection closes
            caught = getattr(self, "_captured_signals", None)
            why = _signal_name(caught[-1]) if caught else "stop"
            log.info("shutting down (%s): %d requests in flight get up to %g s to finish", why, service.in_flight,
                     config.drain_timeout)
            timer = asyncio.get_running_loop().call_later(config.drain_timeout, self._drain_deadline)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

        @staticmethod
        def _drain_deadline():
            log.warning("drain deadline (%g s) passed: answering the %d requests still in flight 503 \"server "
                        "shutting down\"", config.drain_timeout, service.in_flight)
            service.batcher.stop("server shutting down")

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn raises the caught SIGINT / SIGTERM again once it has shut down (a KeyboardInterrupt, or death
            # by SIGTERM): here that signal asked for exactly the stop that just happened, so it is a clean exit
            with super().capture_signals():
                yield
                getattr(self, "_captured_signals", []).clear()

    try:
        app = create_app(lambda: service)
        uv = uvicorn.Config(app, host=host, port=port, log_level=max(logging.WARNING, log.level), access_log=False,
                            http=guarded_h11(config, service.counters), h11_max_incomplete_event_size=MAX_HEAD_BYTES,
                            timeout_keep_alive=config.keep_alive_timeout,
                            limit_concurrency=None,   # the app caps requests in flight; sockets: guarded_h11
                            # a backstop: anything still open this long after SIGTERM is cancelled
                            timeout_graceful_shutdown=config.drain_timeout + 5)
        echo(f"serving {config.engine} on http://{host}:{port} (backend {service.pipe.backend.name}, "
             f"max batch {service.batcher.max_batch}, max n {config.max_n})")
        DrainingServer(uv).run()
        stats = service.batcher.stats()
        log.info("stopped: %d requests completed, %d failed, %d cancelled by their clients; %d engine calls",
                 stats["completed"], stats["failed"], stats["cancelled"], stats["engine_calls"])
    finally:
        service.close()


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"
