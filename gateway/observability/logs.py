"""Request id and tenant on every log line of a request (one context variable + a logging filter).

Logs are text (``FORMAT``) or, with ``log_format = "json"``, one JSON object per line whose
keys are always the same: time, level, logger, message, ``request_id``, ``tenant`` and
``REQUEST_FIELDS`` (null until the request knows them), plus ``exception`` when there is one.
Nothing here logs an API key or a prompt; the services bind only names, counts and statuses.

A request's ``RequestLog`` is part of its ``gateway.api.request.RequestScope``, which the code
serving it passes as an argument. The logging module leaves no such parameter (a record
from vLLM, uvicorn or any library is stamped too), so the log alone is also found through
one context variable, ``_current``, set by the edge for the request's whole life.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import time
import warnings
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

FORMAT = "%(asctime)s %(levelname)s %(name)s [req=%(request_id)s tenant=%(tenant)s] %(message)s"
REQUEST_FIELDS = ("adapter_version", "adapter_tier", "status", "prompt_tokens", "completion_tokens",
                  "trace_id")
LogFormat = Literal["text", "json"]


@dataclass
class RequestLog:
    """What a request's log lines carry: its id, its tenant, and ``REQUEST_FIELDS`` once known."""

    request_id: str
    tenant: str = "-"
    fields: dict[str, Any] = field(default_factory=dict)

    def bind(self, **fields: Any) -> None:
        """Fields (of ``REQUEST_FIELDS``) on every later line of the request."""
        self.fields.update(fields)


# The logging module leaves no parameter for it: see the module docstring.
_current: ContextVar[RequestLog | None] = ContextVar("lgw_request_log", default=None)


def enter(log: RequestLog) -> Token[RequestLog | None]:
    """From here on (this task and those it starts), records carry ``log``'s fields."""
    return _current.set(log)


def leave(token: Token[RequestLog | None]) -> None:
    _current.reset(token)


class RequestContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        log = _current.get()
        record.request_id = log.request_id if log is not None else "-"
        record.tenant = log.tenant if log is not None else "-"
        bound = log.fields if log is not None else {}
        for name in REQUEST_FIELDS:
            if not hasattr(record, name):  # a line's own ``extra`` wins (e.g. its final status)
                setattr(record, name, bound.get(name))
        return True


class Throttled:
    """One line per ``every_s`` seconds per kind of failure, for what fails once per request
    while a service is away: an outage is a few lines, each saying how many it stands for."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0) -> None:
        self._logger = logger
        self.every_s = every_s
        self._seen: dict[str, tuple[float, int]] = {}  # kind -> (last line's time, left out since)

    def log(self, level: int, kind: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last, left_out = self._seen.get(kind, (-math.inf, 0))
        if now - last < self.every_s:
            self._seen[kind] = (last, left_out + 1)
            return
        self._seen[kind] = (now, 0)
        if left_out:
            msg += " (%d more like it in the last %.0fs)"
            args = (*args, left_out, now - last)
        self._logger.log(level, msg, *args)


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
