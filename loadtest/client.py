"""One streamed chat completion against any OpenAI-compatible server, timed token by token."""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

TIER_HEADER = "x-lora-gateway-adapter-tier"
# Which replica answered, when something in front of the replicas names it (behind a router).
REPLICA_HEADER = "x-lora-gateway-replica"


def freeze_heap() -> None:
    """Put everything allocated so far beyond the garbage collector's reach, as vLLM's own
    server does after start-up. Call it once set-up is done, before timing: a full
    collection in a benchmark process that imported torch took 150-230 ms here (measured
    with a gc callback), and one landing in a request's wait counted as its latency."""
    gc.collect()
    gc.freeze()


@dataclass(frozen=True)
class Target:
    """One adapter to call: who calls it (key) and its ``model`` name."""

    tenant: str
    model: str
    api_key: str = field(repr=False)

    @property
    def label(self) -> str:
        return f"{self.tenant}/{self.model}"


@dataclass
class RequestRecord:
    target: str
    phase: str
    started: float  # seconds since the run's start
    status: int = 0  # HTTP status; 0 when the connection failed
    error: str | None = None
    tier: str | None = None  # the gateway's header; None against other servers
    replica: str | None = None  # REPLICA_HEADER, when the answer carries it
    first_on_adapter: bool = False  # the first request on this adapter since its set-up
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)  # gaps between content chunks
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RequestShape:
    prompt: str = "Write one sentence about the sea."
    max_tokens: int = 32
    temperature: float = 0.0


async def send(client: httpx.AsyncClient, base_url: str, target: Target, shape: RequestShape,
               record: RequestRecord, headers: Mapping[str, str] | None = None) -> RequestRecord:
    """Stream one completion into ``record`` (never raises for HTTP or network errors).

    ``headers`` are sent as well (e.g. a router's affinity key such as ``X-Session-ID``).
    """
    body = {"model": target.model, "messages": [{"role": "user", "content": shape.prompt}],
            "max_tokens": shape.max_tokens, "temperature": shape.temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    headers = {**(headers or {}), "Authorization": f"Bearer {target.api_key}"}
    t0 = time.perf_counter()
    last = t0
    chunks = 0
    try:
        async with client.stream("POST", base_url.rstrip("/") + "/v1/chat/completions",
                                 json=body, headers=headers) as resp:
            record.status = resp.status_code
            record.tier = resp.headers.get(TIER_HEADER)
            record.replica = resp.headers.get(REPLICA_HEADER)
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                record.error = _error_message(text)
                return record
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    record.error = str(event["error"].get("message", event["error"]))
                    break
                now = time.perf_counter()
                if any((c.get("delta") or {}).get("content") for c in event.get("choices") or ()):
                    if record.ttft is None:
                        record.ttft = now - t0
                    else:
                        record.itl.append(now - last)
                    last = now
                    chunks += 1
                usage = event.get("usage")
                if usage:
                    record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    record.completion_tokens = int(usage.get("completion_tokens") or 0)
    except (httpx.HTTPError, ValueError) as exc:  # network, or a malformed event
        record.error = f"{type(exc).__name__}: {exc}"
        return record
    record.e2e = time.perf_counter() - t0
    if not record.completion_tokens:
        record.completion_tokens = chunks  # servers that omit usage: one token per chunk
    return record


def _error_message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text[:200]
