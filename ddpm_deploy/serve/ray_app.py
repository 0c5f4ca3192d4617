"""The same HTTP app as a Ray Serve deployment: each replica opens its own runtime and step batcher.

Imported only by `ddpm-deploy serve --ray` (it imports ray at module level, for the deployment class).
"""

from __future__ import annotations

import dataclasses
import signal
import time

import ray
from ray import serve

from ..errors import UserError, first_line, remote_cause
from .app import check_port_free, create_app
from .service import Service, ServeConfig

APP_NAME = "ddpm"
# Requests one replica holds at once: they share its step batcher, so many in flight is the point (Ray Serve's
# default of 5 would queue them in the proxy instead and defeat step-level batching).
MAX_ONGOING_PER_REPLICA = 256


@serve.ingress()
class DdpmReplica:
    """One replica: a Service (runtime + batcher) built in the replica process, and the FastAPI app on it."""

    def __init__(self, config: ServeConfig):
        self.service = Service(config)

    def __serve_build_asgi_app__(self):
        service = self.service
        return create_app(lambda: service)


def run_ray_serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
                  address: str | None = None, echo=print) -> None:
    """Start (or join) Ray, deploy `replicas` replicas behind Ray Serve's HTTP proxy on host:port, and block until
    interrupted (Ctrl-C / SIGTERM), then take the deployment down."""
    if address is None:
        check_port_free(host, port)
    # one CPU per replica, and one runtime thread per CPU unless told otherwise (no oversubscription)
    config = dataclasses.replace(config, threads=config.threads or 1)
    try:
        if address:
            ray.init(address=address, logging_level="ERROR")
        else:
            ray.init(num_cpus=max(2, replicas), include_dashboard=False, logging_level="ERROR")
    except Exception as e:  # noqa: BLE001 - bad address / cluster down: one line
        raise UserError(f"cannot start/join Ray{f' at {address}' if address else ''}: {first_line(e)}") from None
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.start(http_options={"host": host, "port": port})
        deployment = serve.deployment(name="DdpmReplica", num_replicas=replicas,
                                      max_ongoing_requests=MAX_ONGOING_PER_REPLICA,
                                      ray_actor_options={"num_cpus": 1})(DdpmReplica)
        try:
            serve.run(deployment.bind(config), name=APP_NAME, route_prefix="/")
        except Exception as e:  # noqa: BLE001 - a replica failed to open the model: one line
            raise UserError(f"Ray Serve could not start the replicas: {remote_cause(e)}") from None
        echo(f"serving {config.engine} on http://{host}:{port} via Ray Serve ({replicas} replica(s))")
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        if address:   # a shared cluster: take down only our application
            serve.delete(APP_NAME)
        ray.shutdown()   # a local Ray goes with its actors (serve.shutdown() would wait ~30 s for the controller)


def _interrupt(signum, frame):
    raise KeyboardInterrupt
