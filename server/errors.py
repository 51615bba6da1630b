"""Error values of the server: OpenAI-style error responses and the one-line startup error."""

from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import JSONResponse

from .protocol import ErrorInfo, ErrorResponse

INVALID_REQUEST = "invalid_request_error"


class StartupError(Exception):
    """The server cannot start; the message is the one line the user sees."""


def error_response(
    status: HTTPStatus,
    message: str,
    param: str | None = None,
    reason: str | None = None,
    type: str = INVALID_REQUEST,
) -> JSONResponse:
    """An OpenAI-style error (`{"error": {message, type, param, code, reason}}`) with that
    status; `reason` is left out when None, so vLLM-shaped errors stay as vLLM writes them."""
    info = ErrorInfo(message=message, type=type, param=param, code=status, reason=reason)
    body = ErrorResponse(error=info)
    leave_out = {"error": {"reason"}} if reason is None else None
    return JSONResponse(body.model_dump(exclude=leave_out), status_code=status)
