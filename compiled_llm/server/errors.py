"""Errors as OpenAI's API returns them: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

from __future__ import annotations

from fastapi.responses import JSONResponse


DEFAULT_MAX_REQUEST_BYTES = 4 << 20
DEFAULT_READ_TIMEOUT_S = 30.0  # a request body that stops arriving for this long gets 408


class APIError(Exception):
    """A request the server refuses: becomes `error_response(status, message, code, param, headers)`."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 408: "timeout", 413: "invalid_request_error",
               500: "server_error", 503: "service_unavailable"}  # fmt: skip


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}} (also a failed stream's event)."""
    kind = ERROR_TYPES.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
