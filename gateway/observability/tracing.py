"""OpenTelemetry traces of each inference request: off unless the standard ``OTEL_*`` ask.

On when ``OTEL_TRACES_EXPORTER`` names ``otlp`` (or ``console``), or is unset while an OTLP
endpoint is (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``);
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` keeps it off. The SDK reads
the rest as it documents: ``OTEL_SERVICE_NAME`` (default here ``lora-gateway``),
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER[_ARG]``, ``OTEL_BSP_*``,
``OTEL_EXPORTER_OTLP_[TRACES_]{PROTOCOL,HEADERS,TIMEOUT,CERTIFICATE,COMPRESSION}``
(``http/protobuf`` unless the protocol says ``grpc``).

One request is one trace, continuing the caller's W3C ``traceparent``: a SERVER span named
after the route, and under it ``auth``, ``quota``, ``admission``, ``resolve``,
``adapter.acquire`` (with its tier), ``engine.time_to_first_token`` and ``engine.stream``.
The engine span's context goes to vLLM as its ``trace_headers``, so vLLM's own
``llm_request`` span (when its tracing is on: the gateway turns it on with the same
endpoint, ``engine_traces_endpoint``) is that span's child. Attributes are names, counts,
statuses and error types: never a prompt, an answer, a key or an error's message.

Off, every request's trace is ``NO_TRACE``, whose methods do nothing.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

SERVICE_NAME = "lora-gateway"
_W3C = TraceContextTextMapPropagator()
_IDS = re.compile(r"^(/v1/responses)/[^/]+")  # a path's ids leave the span's name


class TracingConfigError(ValueError):
    """The ``OTEL_*`` variables ask for something this gateway cannot export."""


def enabled_by(environ: Mapping[str, str]) -> bool:
    """Whether the ``OTEL_*`` variables ask for traces (module docstring)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = _exporters(environ)
    if exporters:
        return exporters != {"none"}
    return bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def engine_traces_endpoint(environ: Mapping[str, str]) -> tuple[str, str] | None:
    """(endpoint, protocol) for vLLM's own tracing, or None: the gateway's OTLP endpoint for
    traces, as vLLM's exporter takes it (a full URL for HTTP, host:port for gRPC)."""
    if not enabled_by(environ) or "otlp" not in (_exporters(environ) or {"otlp"}):
        return None
    protocol = _protocol(environ)
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if endpoint is None:
        base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if base is None:
            base = "http://localhost:4318" if protocol == "http/protobuf" else "http://localhost:4317"
        endpoint = base.rstrip("/") + "/v1/traces" if protocol == "http/protobuf" else base
    return endpoint, protocol


class Tracing:
    """The gateway's tracer (its own provider, not the process's global one), or none."""

    def __init__(self, exporter: SpanExporter | None = None, *, batch: bool = True,
                 resource: Resource | None = None) -> None:
        self._provider: TracerProvider | None = None
        self._tracer: trace.Tracer | None = None
        if exporter is not None:
            resource = resource or Resource.create({"service.name": _service_name()})
            self._provider = TracerProvider(resource=resource)
            processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
            self._provider.add_span_processor(processor)
            self._tracer = self._provider.get_tracer("lora_gateway")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Tracing:
        if not enabled_by(environ):
            return cls()
        exporters = _exporters(environ) or {"otlp"}
        unknown = exporters - {"otlp", "console", "none"}
        if unknown:
            raise TracingConfigError(f"OTEL_TRACES_EXPORTER names {', '.join(sorted(unknown))}: this "
                             "gateway exports traces with otlp or console only")
        if "console" in exporters:
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter
            return cls(ConsoleSpanExporter())
        if _protocol(environ) == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            return cls(OTLPSpanExporter())
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )
        return cls(HttpExporter())

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def begin(self, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> RequestTrace:
        """A request's trace: its root span, continuing the caller's ``traceparent``."""
        if self._tracer is None:
            return NO_TRACE
        carrier = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers}
        route = _IDS.sub(r"\1/{response_id}", path)
        root = self._tracer.start_span(
            f"{method} {route}", context=propagate.extract(carrier), kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": route, "url.path": path})
        return RequestTrace(self._tracer, root)

    def shutdown(self) -> None:
        """Sends what is buffered, then stops."""
        if self._provider is not None:
            self._provider.shutdown()


class RequestTrace:
    """One request's spans, all children of its root (passed as arguments, no context var)."""

    enabled = True

    def __init__(self, tracer: trace.Tracer, root: Span) -> None:
        self._tracer = tracer
        self._root = root
        self._context = trace.set_span_in_context(root)
        self._engine: Span | None = None

    @property
    def trace_id(self) -> str | None:
        return format(self._root.get_span_context().trace_id, "032x")

    @contextmanager
    def stage(self, name: str, **attributes: Any) -> Iterator[Span]:
        """A span for one stage of the request; an exception marks it (its type only)."""
        span = self._tracer.start_span(name, context=self._context, attributes=attributes)
        try:
            yield span
        except BaseException as exc:
            _failed(span, exc)
            raise
        finally:
            span.end()

    def engine_headers(self) -> dict[str, str] | None:
        """Opens the engine span; its context as W3C headers, for vLLM's ``trace_headers``."""
        self._engine = self._tracer.start_span("engine.time_to_first_token", context=self._context)
        headers: dict[str, str] = {}
        _W3C.inject(headers, context=trace.set_span_in_context(self._engine))
        return headers

    def engine_done(self, first_token_at: float | None, **attributes: Any) -> None:
        """Ends the engine span at the first token (``perf_counter`` time; now when none came),
        and records the stream after it, to now, with ``attributes``."""
        engine, self._engine = self._engine, None
        if engine is None:
            return
        now = time.time_ns()
        if first_token_at is None:
            engine.end(now)
            return
        first = now - int((time.perf_counter() - first_token_at) * 1e9)
        engine.end(first)
        stream = self._tracer.start_span("engine.stream", context=self._context,
                                         start_time=first, attributes=attributes)
        stream.end(now)

    def set(self, **attributes: Any) -> None:
        """Attributes of the whole request (tenant, model, tier, tokens), on the root span."""
        self._root.set_attributes({k: v for k, v in attributes.items() if v is not None})

    def finish(self, status: int | None, outcome: str) -> None:
        if self._engine is not None:  # the answer ended before the engine's part was told
            self.engine_done(None)
        if status is not None:
            self._root.set_attribute("http.response.status_code", status)
        self._root.set_attribute("lgw.outcome", outcome)
        if status is None or status >= 500:
            self._root.set_status(Status(StatusCode.ERROR))
            self._root.set_attribute("error.type", str(status or outcome))
        self._root.end()


class _NoTrace(RequestTrace):
    """Tracing off: nothing is recorded, nothing allocated per request."""

    enabled = False

    def __init__(self) -> None:  # no tracer, no root
        pass

    @property
    def trace_id(self) -> str | None:
        return None

    @contextmanager
    def stage(self, name: str, **attributes: Any) -> Iterator[Span]:
        yield INVALID_SPAN

    def engine_headers(self) -> dict[str, str] | None:
        return None

    def engine_done(self, first_token_at: float | None, **attributes: Any) -> None:
        pass

    def set(self, **attributes: Any) -> None:
        pass

    def finish(self, status: int | None, outcome: str) -> None:
        pass


NO_TRACE: RequestTrace = _NoTrace()


def _failed(span: Span, exc: BaseException) -> None:
    span.set_status(Status(StatusCode.ERROR))
    span.set_attribute("error.type", type(exc).__name__)


def _exporters(environ: Mapping[str, str]) -> set[str]:
    raw = environ.get("OTEL_TRACES_EXPORTER", "")
    return {name.strip().lower() for name in raw.split(",") if name.strip()}


def _protocol(environ: Mapping[str, str]) -> str:
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
    if protocol not in ("http/protobuf", "grpc"):
        raise TracingConfigError(f"OTLP protocol {protocol!r}: this gateway exports traces over "
                         "http/protobuf or grpc")
    return protocol


def _service_name() -> str:
    return os.environ.get("OTEL_SERVICE_NAME") or SERVICE_NAME
