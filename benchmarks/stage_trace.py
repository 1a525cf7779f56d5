"""Run the gateway or vLLM's own OpenAI server with per-request stage timers wrapped around
named functions: where one streamed answer's time goes until its first content token.

    python benchmarks/stage_trace.py gateway --out FILE -- <lora-gateway serve args>
    python benchmarks/stage_trace.py vllm --out FILE -- <vLLM api_server args>

(``python -m benchmarks.stage_trace`` works too; ``benchmarks.first_token`` runs it as a
script so that ``PYTHONPATH`` alone decides which checkout's ``gateway`` is measured.)

Benchmark-only instrumentation, nothing in either server changes: before the server
starts, every target in the tables below ("module:Qualified.name") is replaced by a
timing wrapper. Async functions are timed entry to exit, async generators from each
``__anext__`` to its item, sync functions entry to exit (an async context manager they
return is timed on ``__aenter__``). uvicorn's ``run_asgi`` starts a request's record (a
contextvar, copied into the tasks it starts); the ASGI ``send`` of the first
``http.response.body`` that carries a content delta ends it. Each instant of that window
goes to the innermost stage open then, so the exclusive stage times add up to the total;
one JSON line per request (POST .../completions, keyed by its ``x-trace-id`` header) is
appended to ``--out``. A target that does not exist in the tree being run is skipped and
listed as missing. Not counted: uvicorn parsing the request before ``run_asgi``. Wrappers
take any arguments, so none goes on an ASGI app's own ``__call__`` (uvicorn calls it with
none to detect app factories).
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import inspect
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

OTHER, MIDDLEWARE, SSE_OUT = "other", "middleware", "first SSE event out"
# stage -> targets, for both servers (the gateway runs vLLM's own serving classes in process).
COMMON: dict[str, list[str]] = {
    "body parse and validation": [
        "starlette.requests:Request.body", "starlette.requests:Request.json",
        "fastapi.dependencies.utils:solve_dependencies",
        "vllm.entrypoints.serve.utils.api_utils:validate_json_request"],
    "resolve": ["vllm.entrypoints.serve.engine.serving:BaseServing._check_model",
                "vllm.entrypoints.serve.engine.serving:BaseServing._maybe_get_adapters"],
    "rendering and tokenization": [
        "vllm.entrypoints.openai.chat_completion.serving:OpenAIServingChat.render_chat_request",
        "vllm.renderers.online_renderer:OnlineRenderer.render_chat"],
    "engine to first output": ["vllm.v1.engine.async_llm:AsyncLLM.generate"],
    SSE_OUT: ["starlette.responses:StreamingResponse.__call__",
              "vllm.entrypoints.openai.chat_completion.serving:"
              "OpenAIServingChat.chat_completion_stream_generator"],
    # The outermost of Starlette's middleware stack, up to the router: every middleware in
    # between counts here. (Not FastAPI.__call__: uvicorn probes the app's own signature.)
    MIDDLEWARE: ["starlette.middleware.errors:ServerErrorMiddleware.__call__"],
    OTHER: ["starlette.routing:Router.__call__", "starlette.routing:Route.handle",
            "starlette.concurrency:run_in_threadpool",
            "vllm.entrypoints.openai.chat_completion.serving:OpenAIServingChat.create_chat_completion"],
}
# The gateway's request path: edit here when its functions move or are renamed.
GATEWAY: dict[str, list[str]] = {
    "auth": ["gateway.api.deps:authenticate"],
    "quota lease and prompt-token charge": [
        "gateway.api.guard:guard", "gateway.api.guard:Guard.check",
        "gateway.protection.usage:UsageMeter.open", "gateway.protection.usage:UsageMeter.admit",
        "gateway.protection.usage:UsageMeter.prompt"],
    "admission": ["gateway.api.guard:Guard.admit",
                  "gateway.protection.admission:FairAdmission.acquire"],
    "resolve": ["gateway.tenancy.directory:TenantDirectory.parse",
                "gateway.tenancy.directory:TenantDirectory.resolve",
                "gateway.engine.openai:_Routing._check_model",
                "gateway.engine.openai:_Routing._maybe_get_adapters"],
    "adapter acquire": ["gateway.engine.serving:OpenAIService._acquire",
                        "gateway.residency.manager:AdapterManager.use"],
    OTHER: ["gateway.api.routes:chat_completions", "gateway.api.guard:Guard.serve",
            "gateway.engine.serving:OpenAIService.chat", "gateway.engine.serving:OpenAIService._serve",
            "gateway.engine.openai:VllmOpenAI._call", "gateway.engine.openai:_MeteredClient.generate"],
}
VLLM: dict[str, list[str]] = {
    OTHER: ["vllm.entrypoints.openai.chat_completion.api_router:create_chat_completion"],
}
_HTTP = ("uvicorn.protocols.http.httptools_impl:RequestResponseCycle",
         "uvicorn.protocols.http.h11_impl:RequestResponseCycle")
ROOTS = [f"{c}.run_asgi" for c in _HTTP]  # a request starts (stage: other)
SENDS = [f"{c}.send" for c in _HTTP]  # bytes to the socket (stage: first SSE event out)
STAGE_ORDER = ["body parse and validation", "auth", "quota lease and prompt-token charge", "admission",
               "resolve", "adapter acquire", "rendering and tokenization", "engine to first output",
               SSE_OUT, MIDDLEWARE, OTHER]


def tables(server: str) -> dict[str, list[str]]:
    merged: dict[str, list[str]] = defaultdict(list)
    for table in (COMMON, GATEWAY if server == "gateway" else VLLM):
        for stage, targets in table.items():
            merged[stage] += targets
    return dict(merged)


@dataclass
class Trace:
    t0: float
    trace_id: str
    spans: list[list[Any]] = field(default_factory=list)  # [start, end | None, stage, target]
    first: float | None = None  # when the first content event was written

    def open(self, stage: str, target: str) -> list[Any]:
        span = [time.perf_counter(), None, stage, target]
        self.spans.append(span)
        return span

    def breakdown(self) -> dict[str, Any]:
        """Exclusive ms by stage and by target over [t0, first]: each instant goes to the
        innermost span open then (the latest started; nesting in time)."""
        end = self.first
        assert end is not None
        spans = [(s, min(end if e is None else e, end), i, stage, target)
                 for i, (s, e, stage, target) in enumerate(self.spans) if s < end]
        stages: dict[str, float] = defaultdict(float)
        targets: dict[str, float] = defaultdict(float)
        for a, b in pairwise(sorted({t for s in spans for t in s[:2]})):
            inner = max((s for s in spans if s[0] <= a and s[1] >= b), key=lambda s: (s[0], s[2]))
            stages[inner[3]] += (b - a) * 1000
            targets[inner[4]] += (b - a) * 1000
        return {"id": self.trace_id, "total_ms": (end - self.t0) * 1000, "stages": dict(stages),
                "targets": dict(targets), "spans": len(spans)}


_TRACE: contextvars.ContextVar[Trace | None] = contextvars.ContextVar("stage_trace", default=None)
_OUT: Path | None = None
_WRAPPED: dict[int, Callable[..., Any]] = {}  # id(original) -> its wrapper
_routes_fixed = False


def _active() -> Trace | None:
    tr = _TRACE.get()
    return tr if tr is not None and tr.first is None else None


def _coro(fn: Callable[..., Any], stage: str, name: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        tr = _active()
        if tr is None:
            return await fn(*args, **kwargs)
        span = tr.open(stage, name)
        try:
            return await fn(*args, **kwargs)
        finally:
            span[1] = time.perf_counter()
    return timed


def _agen(fn: Callable[..., Any], stage: str, name: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        gen = fn(*args, **kwargs)
        try:
            while True:
                tr = _active()
                span = tr.open(stage, name) if tr is not None else None
                try:
                    item = await gen.__anext__()
                except StopAsyncIteration:
                    return
                finally:
                    if span is not None:
                        span[1] = time.perf_counter()
                yield item
        finally:
            await gen.aclose()
    return timed


class _TimedContext:
    def __init__(self, cm: Any, stage: str, name: str) -> None:
        self._cm, self._stage, self._name = cm, stage, name

    async def __aenter__(self) -> Any:
        tr = _active()
        span = tr.open(self._stage, self._name) if tr is not None else None
        try:
            return await self._cm.__aenter__()
        finally:
            if span is not None:
                span[1] = time.perf_counter()

    async def __aexit__(self, *exc: Any) -> Any:
        return await self._cm.__aexit__(*exc)


def _sync(fn: Callable[..., Any], stage: str, name: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        tr = _active()
        if tr is None:
            return fn(*args, **kwargs)
        span = tr.open(stage, name)
        try:
            result = fn(*args, **kwargs)
        finally:
            span[1] = time.perf_counter()
        if hasattr(result, "__aenter__") and hasattr(result, "__aexit__"):
            return _TimedContext(result, stage, name)
        return result
    return timed


def _root(fn: Callable[..., Any], stage: str, name: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def run_asgi(self: Any, app: Any) -> None:
        _fix_routes(app)
        scope = self.scope
        if scope.get("method") != "POST" or not str(scope.get("path", "")).endswith("completions"):
            await fn(self, app)
            return
        trace_id = dict(scope.get("headers") or ()).get(b"x-trace-id", b"").decode()
        tr = Trace(0.0, trace_id)
        span = tr.open(OTHER, name)
        tr.t0 = span[0]
        token = _TRACE.set(tr)
        try:
            await fn(self, app)
        finally:
            _TRACE.reset(token)
            span[1] = time.perf_counter()
            if tr.first is not None and _OUT is not None:
                with _OUT.open("a") as out:
                    out.write(json.dumps({**tr.breakdown(), "path": scope.get("path")}) + "\n")
    return run_asgi


def _send(fn: Callable[..., Any], stage: str, name: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def send(self: Any, message: Any) -> None:
        tr = _active()
        if tr is None:
            await fn(self, message)
            return
        span = tr.open(SSE_OUT, name)
        try:
            await fn(self, message)
        finally:
            span[1] = time.perf_counter()
        if message.get("type") == "http.response.body" and has_content(message.get("body", b"")):
            tr.first = span[1]
    return send


def has_content(body: bytes) -> bool:
    """An SSE chunk with a non-empty ``delta.content`` (chat) or ``text`` (completions)."""
    for line in body.decode(errors="replace").splitlines():
        if not line.startswith("data: {"):
            continue
        try:
            choices = json.loads(line[6:]).get("choices") or ()
        except ValueError:
            continue
        if any((c.get("delta") or {}).get("content") or c.get("text") for c in choices):
            return True
    return False


def short(spec: str) -> str:
    """``package.module:Qualified.name`` -> ``module:Qualified.name``."""
    module, _, qualname = spec.partition(":")
    return f"{module.rpartition('.')[2]}:{qualname}"


def _resolve(spec: str) -> tuple[Any, str, Any]:
    """(owner, attribute, raw value); raises LookupError with the reason it is missing."""
    module_name, _, qualname = spec.partition(":")
    try:
        owner: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise LookupError(f"{type(exc).__name__}: {exc}") from None
    *path, attr = qualname.split(".")
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            raise LookupError(f"no {part}")
    if isinstance(owner, type):
        for klass in owner.__mro__:
            if attr in vars(klass):
                return owner, attr, vars(klass)[attr]
        raise LookupError(f"no {qualname}")
    if not hasattr(owner, attr):
        raise LookupError(f"no {qualname}")
    return owner, attr, getattr(owner, attr)


def _wrap(fn: Callable[..., Any], stage: str, spec: str) -> Callable[..., Any]:
    if spec in ROOTS:
        kind = _root
    elif spec in SENDS:
        kind = _send
    elif inspect.isasyncgenfunction(fn):
        kind = _agen
    elif inspect.iscoroutinefunction(fn):
        kind = _coro
    else:
        kind = _sync
    wrapper = kind(fn, stage, short(spec))
    wrapper.__stage_trace__ = spec  # type: ignore[attr-defined]  # a marker on a function object
    return wrapper


def install(server: str) -> dict[str, Any]:
    """Wrap every target of ``server``'s tables; {"found": {stage: [...]}, "missing": {spec: why}}."""
    found: dict[str, list[str]] = defaultdict(list)
    missing: dict[str, str] = {}
    plan = [(OTHER, s) for s in ROOTS] + [(SSE_OUT, s) for s in SENDS]
    plan += [(stage, s) for stage, specs in tables(server).items() for s in specs]
    for stage, spec in plan:
        try:
            owner, attr, raw = _resolve(spec)
        except LookupError as exc:
            missing[spec] = str(exc)
            continue
        fn = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
        if not callable(fn) or hasattr(fn, "__stage_trace__"):
            missing[spec] = "not callable" if not callable(fn) else f"already as {fn.__stage_trace__}"
            continue
        wrapper = _wrap(fn, stage, spec)
        setattr(owner, attr, type(raw)(wrapper) if isinstance(raw, (classmethod, staticmethod)) else wrapper)
        _WRAPPED[id(fn)] = wrapper
        found[stage].append(spec)
    for module in list(sys.modules.values()):  # `from x import f` bindings made before now
        names = getattr(module, "__dict__", None) or {}
        for name, value in list(names.items()):
            if callable(value) and id(value) in _WRAPPED and getattr(value, "__stage_trace__", None) is None:
                setattr(module, name, _WRAPPED[id(value)])
    return {"found": dict(found), "missing": missing}


def _fix_routes(app: Any) -> None:
    """Route endpoints and ``Depends(f)`` hold the functions as they were at import: point
    each route's dependency tree at the wrappers (once, on the first request)."""
    global _routes_fixed
    if _routes_fixed:
        return
    _routes_fixed = True
    for _ in range(16):  # through uvicorn's and the app's own wrappers, to the FastAPI app
        if hasattr(app, "routes") and hasattr(app, "router"):
            break
        app = getattr(app, "app", None)
    stack = [r.dependant for r in getattr(app, "routes", ()) if getattr(r, "dependant", None)]
    while stack:
        dep = stack.pop()
        stack += dep.dependencies
        if dep.call is not None and id(dep.call) in _WRAPPED:
            dep.call = _WRAPPED[id(dep.call)]
            dep.__dict__.pop("cache_key", None)  # FastAPI's per-request dependency cache key


def main(argv: list[str] | None = None) -> int:
    global _OUT
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("gateway", "vllm") or "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    split = argv.index("--")
    server, options, rest = argv[0], argv[1:split], argv[split + 1:]
    _OUT = Path(options[options.index("--out") + 1]).resolve() if "--out" in options else None
    here = Path(__file__).resolve().parent  # run as a script: not a top-level package folder
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    report = install(server)
    if server == "gateway":  # which checkout's gateway this is (PYTHONPATH decides)
        report["gateway_package"] = str(Path(importlib.import_module("gateway").__file__ or "?").parent)
    print("stage_trace " + json.dumps({"server": server, **report}), flush=True)
    if _OUT is not None:
        _OUT.with_suffix(".targets.json").write_text(json.dumps(report, indent=2) + "\n")
    if server == "gateway":
        from lora_gateway.cli import main as gateway_main

        return gateway_main(["serve", *rest])
    import runpy

    sys.argv = ["vllm.entrypoints.openai.api_server", *rest]
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
