"""Running the gateway: bind its ports, start the app's lifespan, serve until stopped, drain.

``serve_settings`` is what ``lora-gateway serve`` and the demo run. The listening sockets
are bound here (with TCP_NODELAY on every connection, under uvloop) before the engine
starts; SIGTERM drains in-flight requests before uvicorn shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

from adapters_registry import RegistryError
from gateway.config import GatewaySettings
from gateway.errors import BaseMismatchError

_CUT_AFTER_S = 1  # after the drain: how long uvicorn waits before it cancels what still runs

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI


def serve_settings(settings: GatewaySettings, log_level: str, *, command: str,
                   on_started: Callable[[], None] | None = None) -> int:
    """Listen, start the engine, serve until stopped; the exit code (2: cannot start).

    The ports are bound first: a port that is taken is said in one line at once, and nothing
    the engine opens while it starts (vLLM picks free ports of its own) can take ours.
    ``on_started`` runs once the server accepts requests.
    """
    import uvicorn  # the server's imports only where it runs

    from gateway.app import create_app
    from gateway.observability.tracing import TracingConfigError

    try:
        sockets = listen(settings)
    except OSError as exc:
        print(f"{command}: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 2
    try:
        app = create_app(settings)
    except TracingConfigError as exc:
        for sock in sockets:
            sock.close()
        print(f"{command}: {exc}", file=sys.stderr)
        return 2
    # The lifespan runs here rather than inside uvicorn, so a gateway that cannot start
    # (base not registered, schema not migrated, database unreachable) says why in one
    # line and exits 2 instead of printing uvicorn's traceback.
    # JSON: uvicorn's own lines go through the root handler too (one format on stdout).
    log_config = None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG
    # The drain itself happens before uvicorn's shutdown (DrainingServer); what is still
    # running when uvicorn stops gets this long more, then it is cancelled.
    config = uvicorn.Config(app, log_level=log_level, lifespan="off", log_config=log_config,
                            timeout_graceful_shutdown=_CUT_AFTER_S)
    try:
        serve(app, _draining_server(config, app, settings.drain_grace_seconds), sockets,
              on_started)
    except (BaseMismatchError, RegistryError) as exc:
        logging.getLogger(__name__).critical("cannot start: %s", exc)
        return 2
    finally:
        for sock in sockets:
            sock.close()
    services = getattr(app.state, "services", None)
    if services is not None and not services.ready:
        logging.getLogger(__name__).critical("exiting because the inference engine died")
        return 70  # EX_SOFTWARE: the supervisor restarts us
    return 0


def _draining_server(config: uvicorn.Config, app: FastAPI, grace_s: float) -> uvicorn.Server:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """Stops on SIGTERM (or SIGINT) the way a load balancer needs it to.

        The first signal starts the drain: readiness fails at once, while the server keeps
        answering (liveness, metrics, and 503 with Retry-After to new inference requests,
        see gateway.api.guard). Once no request is in flight, or ``grace_s`` has passed,
        uvicorn stops: a stream still running ends with an error event at its next event,
        and whatever still runs ``_CUT_AFTER_S`` later is cancelled. A second
        signal stops at once. Unlike uvicorn's own handler, a handled signal is not
        raised again after shutdown: a drained gateway exits 0.
        """

        _drain_until: float | None = None

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            services = getattr(app.state, "services", None)
            if self._drain_until is not None or services is None or not services.ready:
                # A second signal, or nothing to drain (not started yet, or the engine
                # died: its requests fail anyway and the supervisor wants it gone).
                self.force_exit = self.should_exit
                self.should_exit = True
                return
            services.draining = True
            self._drain_until = time.monotonic() + grace_s
            logging.getLogger(__name__).info(
                "draining: up to %.0fs for requests in flight; a second signal stops now", grace_s)

        async def on_tick(self, counter: int) -> bool:
            if self._drain_until is not None and not self.should_exit and (
                    not self.server_state.tasks or time.monotonic() >= self._drain_until):
                if self.server_state.tasks:
                    logging.getLogger(__name__).warning(
                        "drain grace over: cutting %d request(s) in flight",
                        len(self.server_state.tasks))
                    app.state.services.openai.cut_streams()
                self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer(config)


def serve(app: FastAPI, server: uvicorn.Server, sockets: list[socket.socket],
          on_started: Callable[[], None] | None = None) -> None:
    """Run ``app``'s lifespan and ``server`` on ``sockets`` until it stops.

    On uvloop, as vLLM's own server runs: its event loop costs less per request and per
    stream event than asyncio's, and it sets TCP_NODELAY on every TCP connection itself.
    """
    import uvloop

    uvloop.run(_serve(app, server, sockets, on_started))


async def _serve(app: FastAPI, server: uvicorn.Server, sockets: list[socket.socket],
                 on_started: Callable[[], None] | None = None) -> None:
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()  # startup errors propagate to run(), nothing to undo
    try:
        serving = asyncio.ensure_future(server.serve(sockets=sockets))
        while on_started is not None and not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if on_started is not None and server.started:
            on_started()
        await serving
    finally:
        await lifespan.__aexit__(None, None, None)


def listen(settings: GatewaySettings) -> list[socket.socket]:
    """The API port's listening socket, then the metrics port's if it has one."""
    sockets = [_bind(settings.host, settings.port)]
    try:
        if settings.metrics_port is not None:
            sockets.append(_bind(settings.metrics_host or settings.host, settings.metrics_port))
    except OSError:
        sockets[0].close()
        raise
    return sockets


def _bind(host: str, port: int) -> socket.socket:
    """A TCP listening socket whose every accepted connection sends small writes at once.

    Named IPPROTO_TCP rather than 0: asyncio sets TCP_NODELAY on an accepted connection
    only when its socket says it is TCP (``base_events._set_nodelay`` checks ``proto``), and
    an accepted socket takes the listener's ``proto``. Without it, Nagle's algorithm held
    each SSE event behind the client's delayed acknowledgement of the one before: about
    40 ms on the first token of every request after the first on a kept-alive connection.
    TCP_NODELAY is also set on the listener, which Linux copies to accepted sockets, so no
    event loop can serve a connection without it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock
