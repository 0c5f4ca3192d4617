"""`ddpm-deploy serve` in a child process, for tests, benchmarks and scripts that drive its HTTP API."""
# httpx (the serve extra) is imported by the functions that call the server.

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`ddpm-deploy serve ARGS` on 127.0.0.1 at a free port, in its own process group: ready once /healthz answers
    200, stopped (SIGTERM, then SIGKILL) on close. If it exits or is not up within `startup_s`, RuntimeError with
    its output. The output goes to a temporary file, not a pipe nobody reads (a full pipe would block the server)."""

    def __init__(self, *args, startup_s: float = 60.0):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.TemporaryFile(mode="w+")
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        self.proc = subprocess.Popen([sys.executable, "-m", "ddpm_deploy.cli", "serve", *map(str, args), "--port",
                                      str(self.port)], stdout=self._log, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True)
        deadline = time.time() + startup_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.close()
        raise RuntimeError(f"server not up after {startup_s}s: {self.output()}")

    def output(self) -> str:
        """Everything the server printed so far."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url + "/healthz", timeout=10).json()

    def close(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
