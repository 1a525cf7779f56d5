"""An OTLP/HTTP traces receiver: what a collector gets from the gateway and from vLLM.

``POST /v1/traces`` with OpenTelemetry's protobuf ``ExportTraceServiceRequest`` (gzip or
not), decoded with the protocol's own generated classes (``opentelemetry-proto``) and kept
in memory; answers as a collector does. The tracing test and the request-path benchmark's
``traced`` variant point ``OTEL_EXPORTER_OTLP_ENDPOINT`` at it.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

PATH = "/v1/traces"


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    service: str  # the resource's service.name
    trace_id: str  # hex, as W3C writes them
    span_id: str
    parent_id: str | None
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


class OtlpReceiver:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self.requests = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != PATH:
                    self.send_error(404)
                    return
                receiver._add(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self._host = host
        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="otlp-receiver")
        self._thread.start()

    @property
    def endpoint(self) -> str:
        """``OTEL_EXPORTER_OTLP_ENDPOINT`` for it (exporters add ``/v1/traces``)."""
        port = self._server.server_address[1]
        return f"http://{self._host}:{port}"

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def wait_for(self, done: Callable[[list[ReceivedSpan]], bool],
                 timeout_s: float = 30) -> list[ReceivedSpan]:
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.spans()
            if done(spans):
                return spans
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(spans)} spans received, not the ones expected: "
                                   f"{sorted({s.name for s in spans})}")
            time.sleep(0.05)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _add(self, request: ExportTraceServiceRequest) -> None:
        received = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            service = str(resource.get("service.name", "?"))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(ReceivedSpan(
                        span.name, service, span.trace_id.hex(), span.span_id.hex(),
                        span.parent_span_id.hex() or None, span.start_time_unix_nano,
                        span.end_time_unix_nano, {a.key: _value(a.value) for a in span.attributes}))
        with self._lock:
            self.requests += 1
            self._spans.extend(received)


def render(spans: Sequence[ReceivedSpan], trace_id: str) -> str:
    """One trace as a tree: each span's start after the trace's first, its duration."""
    mine = [s for s in spans if s.trace_id == trace_id]
    if not mine:
        return f"trace {trace_id}: no spans\n"
    t0 = min(s.start_ns for s in mine)
    ids = {s.span_id for s in mine}
    children: dict[str | None, list[ReceivedSpan]] = {}
    for s in mine:
        children.setdefault(s.parent_id if s.parent_id in ids else None, []).append(s)
    lines = [f"trace {trace_id}"]

    def walk(parent: str | None, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda s: (s.start_ns, s.name)):
            lines.append(f"{'  ' * depth}{s.name:<{40 - 2 * depth}} [{s.service}] "
                         f"+{(s.start_ns - t0) / 1e6:8.1f} ms  {s.ms:8.1f} ms")
            walk(s.span_id, depth + 1)

    walk(None, 1)
    return "\n".join(lines) + "\n"


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return None if kind is None else getattr(value, kind)
