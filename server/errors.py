"""OpenAI's error schema and the exception handlers that produce it.

Every error leaves the server as `{"error": {"message", "type", "param", "code"}}`.
Client mistakes are 4xx (never 422, never 500); 500 is reserved for server bugs.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

# OpenAI's `type` values
INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
RATE_LIMIT = "rate_limit_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable_error"


class APIError(Exception):
    """An error with an HTTP status that the client is meant to see."""

    def __init__(self, status_code: int, message: str, type: str = INVALID_REQUEST,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, INVALID_REQUEST, param, code)


def error_body(message: str, type: str = INVALID_REQUEST, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status_code: int, message: str, type: str = INVALID_REQUEST,
                   param: str | None = None, code: str | int | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status_code,
                        headers=headers)


def api_error_response(exc: APIError) -> JSONResponse:
    return error_response(exc.status_code, exc.message, exc.type, exc.param, exc.code,
                          exc.headers)


def error_event(exc: APIError | str) -> str:
    """An SSE event carrying an error, for failures after a stream has started."""
    if isinstance(exc, str):
        body = error_body(exc, SERVER_ERROR)
    else:
        body = error_body(exc.message, exc.type, exc.param, exc.code)
    return f"data: {json.dumps(body)}\n\n"


def _loc(loc: tuple[Any, ...]) -> str | None:
    # drop pydantic's union-branch tags ("str", "list[int]"...) and "body"
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and (
        "[" in p or p in ("str", "int", "float", "bool", "function-after")
        or p.startswith("constrained-")))]
    return ".".join(parts) or None


def validation_error_to_api(errors: list[dict[str, Any]]) -> APIError:
    """The first pydantic error, phrased for a client: 'param: message'."""
    if not errors:
        return bad_request("invalid request")
    # our own checks (value_error) say more than a broken limit (too_long,
    # less_than_equal...), which says more than a failed branch of a union type
    def rank(e: dict[str, Any]) -> int:
        etype = str(e.get("type", ""))
        return 0 if etype == "value_error" else 2 if etype.endswith("_type") else 1

    err = min(errors, key=rank)
    errors = [err] + [e for e in errors if e is not err]
    msg = str(err.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    etype = err.get("type", "")
    if etype == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return bad_request(f"request body is not valid JSON: {detail}".rstrip(": "),
                           code="invalid_json")
    if etype == "model_type" and not err.get("loc"):
        return bad_request("request body must be a JSON object", code="invalid_json")
    param = _loc(tuple(err.get("loc", ())))
    if etype == "missing":
        msg = "field required"
    text = f"{param}: {msg}" if param else msg
    if len(errors) > 1 and param is not None:
        others = {_loc(tuple(e.get("loc", ()))) for e in errors[1:]} - {param, None}
        if others:
            text += f" (also invalid: {', '.join(sorted(others))})"
    return bad_request(text, param=param)


def install_error_handlers(app: FastAPI,
                           on_error: Callable[[Request, int], None] | None = None) -> None:
    """Map every exception to OpenAI's schema. `on_error(request, status)` feeds metrics."""

    def _note(request: Request, status: int) -> None:
        if on_error is not None:
            try:
                on_error(request, status)
            except Exception:  # metrics must never break error reporting
                log.exception("error hook failed")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        _note(request, exc.status_code)
        return api_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        api = validation_error_to_api(list(exc.errors()))
        _note(request, 400)
        return api_error_response(api)

    @app.exception_handler(ValidationError)
    async def _pydantic_validation(request: Request, exc: ValidationError) -> JSONResponse:
        api = validation_error_to_api(exc.errors())
        _note(request, 400)
        return api_error_response(api)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 404:
            msg = f"no route {request.method} {request.url.path}"
            code: str | int | None = "not_found"
        elif status == 405:
            msg = f"method {request.method} not allowed on {request.url.path}"
            code = "method_not_allowed"
        else:
            msg = str(exc.detail)
            code = status
        _note(request, status)
        return error_response(status, msg, INVALID_REQUEST if status < 500 else SERVER_ERROR,
                              code=code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        _note(request, 500)
        return error_response(500, f"internal server error: {type(exc).__name__}",
                              SERVER_ERROR, code="internal_error")
