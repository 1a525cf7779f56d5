"""A pass-through in front of one gateway replica, for benchmarks behind vllm-router.

    python -m benchmarks.router_shim --port P --upstream http://127.0.0.1:Q --name r0

vllm-router 0.1.17 parses every chat/completions body into its own (SGLang-derived)
request type and re-serializes it, adding fields vLLM's OpenAI server does not define
(``no_stop_trim``, ``return_hidden_states``, and on chat ``separate_reasoning`` and
``stream_reasoning``; vllm-project/router#110). The gateway accepts exactly vLLM's
parameters and answers 400 to those. This shim drops each of them only when it carries
the router's default (a no-op); any other value is forwarded and refused by the gateway
as usual. It also stamps ``x-lora-gateway-replica: <name>`` on every answer, so a
benchmark knows which replica served a request through the router. It stands in for a
gateway change (accepting the router's no-op defaults); it is not part of the product.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from loadtest.client import REPLICA_HEADER

# What vllm-router adds to every body, with the value it adds: no-ops when left at that.
ROUTER_DEFAULTS: dict[str, Any] = {"no_stop_trim": False, "return_hidden_states": False,
                                   "separate_reasoning": True, "stream_reasoning": True}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host",
               "content-encoding"}


def strip_router_defaults(body: bytes) -> bytes:
    """``body`` without the router's added fields where they hold the router's default."""
    try:
        data = json.loads(body)
    except ValueError:
        return body  # not JSON: the gateway answers it with its own 400
    if not isinstance(data, dict):
        return body
    for key, default in ROUTER_DEFAULTS.items():
        if key in data and data[key] is default:
            del data[key]
    return json.dumps(data).encode()


def create_app(upstream: str, name: str) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(base_url=upstream, timeout=httpx.Timeout(600, connect=5),
                                     limits=httpx.Limits(max_connections=256)) as client:
            app.state.client = client
            yield

    async def forward(request: Request) -> Response:
        client: httpx.AsyncClient = request.app.state.client
        body = await request.body()
        if request.method == "POST" and request.url.path.startswith("/v1/"):
            body = strip_router_defaults(body)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        upstream_request = client.build_request(request.method, request.url.path,
                                                params=request.query_params, headers=headers,
                                                content=body)
        try:
            answer = await client.send(upstream_request, stream=True)
        except httpx.HTTPError as exc:
            return JSONResponse({"error": {
                "message": f"replica {name} unreachable: {type(exc).__name__}",
                "type": "service_unavailable", "param": None, "code": "replica_unreachable"}},
                status_code=503, headers={REPLICA_HEADER: name})

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in answer.aiter_raw():
                    yield chunk
            finally:
                await answer.aclose()

        out = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_BY_HOP}
        out[REPLICA_HEADER] = name
        return StreamingResponse(chunks(), status_code=answer.status_code, headers=out)

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the replica's base URL")
    parser.add_argument("--name", required=True, help="the replica's name, stamped on answers")
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.upstream, args.name), host="127.0.0.1", port=args.port,
                log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
