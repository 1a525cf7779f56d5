"""Request id and tenant on every log line of a request (contextvars + a logging filter).

Logs are text (``FORMAT``) or, with ``log_format = "json"``, one JSON object per line whose
keys are always the same: time, level, logger, message, ``request_id``, ``tenant`` and
``REQUEST_FIELDS`` (null until the request knows them), plus ``exception`` when there is one.
Nothing here logs an API key or a prompt; the services bind only names, counts and statuses.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import uuid
import warnings
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
tenant_var: ContextVar[str] = ContextVar("tenant", default="-")
# One dict per request, shared by the tasks serving it (a stream's runs in a child task).
_request_fields: ContextVar[dict[str, Any] | None] = ContextVar("request_fields", default=None)
REQUEST_ID_HEADER = "x-request-id"
REPLICA_HEADER = "x-lora-gateway-replica"
FORMAT = "%(asctime)s %(levelname)s %(name)s [req=%(request_id)s tenant=%(tenant)s] %(message)s"
REQUEST_FIELDS = ("adapter_version", "adapter_tier", "status", "prompt_tokens", "completion_tokens")
LogFormat = Literal["text", "json"]


def bind(**fields: Any) -> None:
    """Fields (of ``REQUEST_FIELDS``) of the current request, on its every later log line."""
    current = _request_fields.get()
    if current is not None:
        current.update(fields)


class RequestContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        record.tenant = tenant_var.get()
        bound = _request_fields.get() or {}
        for name in REQUEST_FIELDS:
            if not hasattr(record, name):  # a line's own ``extra`` wins (e.g. its final status)
                setattr(record, name, bound.get(name))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, the same keys on every line (ASCII: always one line)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"), "tenant": getattr(record, "tenant", "-"),
        }
        line.update({name: getattr(record, name, None) for name in REQUEST_FIELDS})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def log_handler(log_format: LogFormat = "text", stream: IO[str] | None = None) -> logging.Handler:
    """A handler that writes ``log_format`` lines with the request context fields."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(FORMAT))
    handler.addFilter(RequestContextFilter())
    return handler


def configure_logging(level: str = "INFO", log_format: LogFormat = "text") -> None:
    """Once, at the entry point: every line through one handler, with the request context."""
    root = logging.getLogger()
    root.handlers[:] = [log_handler(log_format)]
    root.setLevel(level.upper())
    # Alembic's plugin set-up lines (one per plugin, at every start) say nothing anyone acts on.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


# Start-up messages known to be harmless on a CPU-only vLLM install, each identified by the
# logger that emits it and the start of its message template (never a whole logger muted).
KNOWN_HARMLESS: tuple[tuple[str, str], ...] = (
    ("vllm.triton_utils.importing", "Triton not installed or not compatible"),  # CPU: no Triton
    ("vllm.platforms.cpu", "Triton is not installed. triton-cpu is expected"),  # likewise
    ("torch._library.triton", "Triton not available, find_triton_kernels"),  # likewise
    ("vllm.config.vllm", "Model Runner V2 requires Triton"),  # vLLM picks the V1 runner itself
    ("vllm.config.vllm", "Inductor compilation was disabled by user settings"),  # CPU runs eager
    ("vllm.platforms.cpu", "Reset SSM cache type to float32"),  # no Mamba layers in a Llama base
)
# vLLM's Triton shim touches a deprecated torch attribute while scanning modules:
# (message start, category, module that warns).
HARMLESS_WARNING = ("`torch.distributed.reduce_op` is deprecated", FutureWarning,
                    "vllm.triton_utils.dispatcher")


class KnownHarmlessFilter(logging.Filter):
    """Drops the records listed in KNOWN_HARMLESS and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        template = str(record.msg)
        return not any(record.name == name and template.startswith(start)
                       for name, start in KNOWN_HARMLESS)


def quiet_known_harmless(config_dir: Path) -> None:
    """Once, at the entry point: drop KNOWN_HARMLESS here and in vLLM's engine processes.

    vLLM spawns its engine processes on CPU, so filters set here do not reach them; they
    get the same filter through a logging config file (``VLLM_LOGGING_CONFIG_PATH``,
    unless the operator set one) and the warning filter through ``PYTHONWARNINGS``.
    """
    harmless = KnownHarmlessFilter()
    for name in {name for name, _ in KNOWN_HARMLESS}:
        logging.getLogger(name).addFilter(harmless)
    message, category, module = HARMLESS_WARNING
    warnings.filterwarnings("ignore", re.escape(message), category, re.escape(module))
    rule = f"ignore:{message}:{category.__name__}:{module}"  # -W syntax: literal, not a regex
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, (os.environ.get("PYTHONWARNINGS"), rule)))
    if "VLLM_LOGGING_CONFIG_PATH" in os.environ:
        return
    from vllm.logger import DEFAULT_LOGGING_CONFIG  # vLLM's own handlers, plus the filter

    config = copy.deepcopy(DEFAULT_LOGGING_CONFIG)
    config["filters"] = {"known_harmless": {"()": f"{__name__}.KnownHarmlessFilter"}}
    for name in {name for name, _ in KNOWN_HARMLESS}:
        config["loggers"].setdefault(name, {})["filters"] = ["known_harmless"]
    path = Path(config_dir) / "vllm-logging.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(path)


class RequestContext:
    """Gives each request an id (the caller's ``x-request-id`` if sane) and echoes it back,
    with the name of the replica that answered (``x-lora-gateway-replica``)."""

    def __init__(self, app: ASGIApp, replica: str | None = None) -> None:
        self.app = app
        self._replica = [(REPLICA_HEADER.encode(), replica.encode())] if replica else []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers", ())).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        rid = given if 0 < len(given) <= 64 and given.isprintable() else uuid.uuid4().hex
        token = request_id_var.set(rid)
        tenant_token = tenant_var.set("-")
        fields_token = _request_fields.set({})

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                headers.append((REQUEST_ID_HEADER.encode(), rid.encode()))
                headers.extend(self._replica)
                bind(status=str(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)
            tenant_var.reset(tenant_token)
            _request_fields.reset(fields_token)
