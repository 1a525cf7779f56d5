"""Errors a request can end with, and their one translation to OpenAI's envelope.

    GatewayError                    status, type, code
    ├── InvalidRequestError         400 invalid_request_error
    │   └── ContextLengthError      400 invalid_request_error / context_length_exceeded
    ├── AuthenticationFailedError   401 authentication_error / invalid_api_key
    ├── ModelNotFoundError          404 invalid_request_error / model_not_found
    ├── PayloadTooLargeError        413 invalid_request_error / payload_too_large
    ├── AdapterUnavailableError     503 server_error / adapter_unavailable
    ├── OverloadedError             503 server_error / overloaded
    └── EngineUnavailableError      503 server_error / engine_unavailable
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


class InvalidRequestError(GatewayError):
    status = 400
    type = "invalid_request_error"
    code: str | None = None


class ContextLengthError(InvalidRequestError):
    code = "context_length_exceeded"


class AuthenticationFailedError(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFoundError(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist or you do not have access to it.",
                         param="model")


class PayloadTooLargeError(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class AdapterUnavailableError(GatewayError):
    status = 503
    code = "adapter_unavailable"


class OverloadedError(GatewayError):
    status = 503
    code = "overloaded"


class EngineUnavailableError(GatewayError):
    status = 503
    code = "engine_unavailable"
