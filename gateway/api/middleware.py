"""Pure ASGI middleware: body size limit, and the metrics port kept apart from the API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import PayloadTooLargeError, RouteNotFoundError

METRICS_PATH = "/metrics"


class BodySizeLimit:
    """Refuses bodies over ``max_bytes`` with 413, declared or streamed (pure ASGI)."""

    def __init__(self, app: ASGIApp, max_bytes: int, exempt: Callable[[str], bool] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt  # routes that stream big bodies and enforce their own limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self.exempt is not None and self.exempt(scope["path"])):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge(self.max_bytes)
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send: Send) -> None:
        err = PayloadTooLargeError(f"request body exceeds {self.max_bytes} bytes")
        await JSONResponse(err.body(), status_code=413)({"type": "http"}, _no_receive, send)


class _TooLarge(StarletteHTTPException):
    # An HTTPException, so FastAPI's body parsing lets it through instead of calling
    # it a malformed body (400).
    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body exceeds {max_bytes} bytes")


async def _no_receive() -> Any:
    return {"type": "http.disconnect"}


class MetricsPortSplit:
    """One server, two listening ports: /metrics only on the metrics port, never on the API's.

    Tenants reach the API port; the metrics (every tenant's and adapter's request counts)
    are for the monitoring system alone, on a port a NetworkPolicy can keep apart.
    """

    def __init__(self, app: ASGIApp, metrics_port: int) -> None:
        self.app = app
        self.metrics_port = metrics_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        server = scope.get("server")
        on_metrics_port = server is not None and server[1] == self.metrics_port
        if on_metrics_port != (scope["path"] == METRICS_PATH):
            err = RouteNotFoundError("Not Found")
            await JSONResponse(err.body(), status_code=404)(scope, receive, send)
            return
        await self.app(scope, receive, send)
