"""Error values of the server: OpenAI- or Anthropic-style error responses, the startup error."""

from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import JSONResponse

from .protocol import AnthropicErrorInfo, AnthropicErrorResponse, ErrorInfo, ErrorResponse

INVALID_REQUEST = "invalid_request_error"
ANTHROPIC_PREFIX = "/v1/messages"  # vLLM answers these routes in Anthropic's error shape


class StartupError(Exception):
    """The server cannot start; the message is the one line the user sees."""


def error_body(
    status: HTTPStatus,
    message: str,
    param: str | None = None,
    reason: str | None = None,
    type: str = INVALID_REQUEST,
) -> dict:
    """An OpenAI-style error body (`{"error": {message, type, param, code, reason}}`);
    `reason` is left out when None, so vLLM-shaped errors stay as vLLM writes them."""
    info = ErrorInfo(message=message, type=type, param=param, code=status, reason=reason)
    leave_out = {"error": {"reason"}} if reason is None else None
    return ErrorResponse(error=info).model_dump(exclude=leave_out)


def error_response(
    status: HTTPStatus,
    message: str,
    param: str | None = None,
    reason: str | None = None,
    type: str = INVALID_REQUEST,
) -> JSONResponse:
    """error_body's error as a response with that status."""
    return JSONResponse(error_body(status, message, param, reason, type), status_code=status)


def error_response_for(
    path: str, status: HTTPStatus, message: str, param: str | None, reason: str
) -> JSONResponse:
    """A client error in the shape the route's clients parse: Anthropic's on /v1/messages and
    below (`{"type": "error", "error": {type, message, param, reason}}`), OpenAI's elsewhere."""
    if path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/"):
        info = AnthropicErrorInfo(type=INVALID_REQUEST, message=message, param=param, reason=reason)
        return JSONResponse(AnthropicErrorResponse(error=info).model_dump(), status_code=status)
    return error_response(status, message, param, reason)
