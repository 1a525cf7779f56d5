"""Every exception the gateway raises, and the one shape of its error answers.

Answers to a request (each becomes OpenAI's envelope, ``error_body``):

    GatewayError                    status, type, code
    ├── InvalidRequestError         400 invalid_request_error
    │   └── ContextLengthError      400 invalid_request_error / context_length_exceeded
    ├── AuthenticationFailedError   401 authentication_error / invalid_api_key
    ├── RouteNotFoundError          404 invalid_request_error / not_found (e.g. admin API off)
    ├── ModelNotFoundError          404 invalid_request_error / model_not_found
    ├── CacheConflictError          409 invalid_request_error / conflict (evict in use, pin too many)
    ├── PayloadTooLargeError        413 invalid_request_error / payload_too_large
    ├── RateLimitError              429 requests|tokens / rate_limit_exceeded (quota, tenant queue)
    ├── AdapterUnavailableError     503 server_error / adapter_unavailable
    ├── OverloadedError             503 server_error / overloaded
    └── EngineUnavailableError      503 server_error / engine_unavailable

Any of them may carry ``retry_after`` (seconds): the answer then has a ``Retry-After``.

Not an answer:

    ClientGoneError                 the client left while queued (counted as aborted)

Engine failures, raised by ``gateway.engine`` and translated by the services:

    EngineError                     one request failed; the engine is fine
    ├── EngineRequestError          the engine refused the request's parameters (→ 400)
    └── AdapterRejectedError        the engine refused to load an adapter (→ 503 for it)
    EngineDeadError                 the engine is gone for every request (→ 503, restart)

At start-up:

    BaseMismatchError               the checkpoint is not the registered base; refuse to start
    ServingLayerMismatchError       the installed vLLM's OpenAI serving layer is not the one
                                    the gateway targets (0.32.*); refuse to start
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel


def error_body(message: str, type: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope: the one shape of every error the gateway answers with."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """``error_body``'s shape, for the OpenAPI document."""

    error: ErrorDetail


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.",
                                "schema": {"type": "integer", "minimum": 1}}}
_STATUSES: dict[int, tuple[str, dict[str, Any]]] = {
    400: ("Invalid request: a malformed or invalid body, parameter or name (`param` names it).", {}),
    401: ("Missing or unknown API key (`invalid_api_key`).", {}),
    404: ("Not found: for `model`, anything the caller does not own (`model_not_found`).", {}),
    409: ("Conflict with the current state (`conflict`).", {}),
    413: ("Request body over the size limit (`payload_too_large`).", {}),
    422: ("The adapter failed the compatibility check (`incompatible_adapter`).", {}),
    429: ("Over one of the tenant's limits (`rate_limit_exceeded`).", _RETRY_AFTER),
    503: ("Adapter, database or engine unavailable, overloaded, or not ready.", _RETRY_AFTER),
}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for the error statuses a route answers, each in the envelope."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        description, headers = _STATUSES[status]
        out[status] = {"model": ErrorResponse, "description": description}
        if headers:
            out[status]["headers"] = headers
    return out


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class InvalidRequestError(GatewayError):
    status = 400
    type = "invalid_request_error"
    code: str | None = "invalid_request"


class InvalidValueError(InvalidRequestError):
    code = "invalid_value"


class ContextLengthError(InvalidRequestError):
    code = "context_length_exceeded"


class AuthenticationFailedError(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class RouteNotFoundError(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFoundError(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        # Names are echoed, but never at any length a caller chooses.
        shown = model if len(model) <= 200 else model[:200] + "…"
        super().__init__(f"The model `{shown}` does not exist or you do not have access to it.",
                         param="model")


class ResponseNotFoundError(GatewayError):
    """A stored response that is not there, or not the caller's (the same answer)."""

    status = 404
    type = "invalid_request_error"
    code = "response_not_found"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="response_id")

    @classmethod
    def of(cls, response_id: str) -> ResponseNotFoundError:
        shown = response_id if len(response_id) <= 200 else response_id[:200] + "…"
        return cls(f"Response with id '{shown}' not found.")


class CacheConflictError(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLargeError(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class RateLimitError(GatewayError):
    """Over one of the tenant's limits; ``kind`` is OpenAI's type: "requests" or "tokens"."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, kind: str = "requests",
                 retry_after: float | None = None) -> None:
        super().__init__(message, retry_after=retry_after)
        self.type = kind


class AdapterUnavailableError(GatewayError):
    status = 503
    code = "adapter_unavailable"


class OverloadedError(GatewayError):
    status = 503
    code = "overloaded"


class EngineUnavailableError(GatewayError):
    status = 503
    code = "engine_unavailable"


class ClientGoneError(Exception):
    """The client disconnected while its request waited for the engine: nobody to answer."""


class EngineError(Exception):
    """An engine failure that concerns one request only."""


class EngineRequestError(EngineError):
    """The engine refused the request's parameters: the caller's mistake (a 400)."""


class AdapterRejectedError(EngineError):
    """The engine refused to load an adapter; the engine itself is fine."""


class EngineDeadError(Exception):
    """The engine is gone for every request: the process must be restarted."""


class BaseMismatchError(RuntimeError):
    """The checkpoint on disk is not the base the registry says this gateway serves."""


class ServingLayerMismatchError(RuntimeError):
    """The installed vLLM's OpenAI serving classes are not the ones the gateway was built on."""
