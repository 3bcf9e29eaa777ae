"""One error type for the service and one JSON shape for every error response.

The shape, ``{"error": "<message>", "code": "<machine code>", "request_id": "..."}``, is the Open Inference
Protocol's (whose clients, ``tritonclient`` among them, read ``error`` as a string) plus a stable ``code``.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["ServeError", "ErrorBody", "ERROR_RESPONSES", "install_error_handlers", "error_response"]

log = logging.getLogger("ganet.serve")


class ServeError(Exception):
    """A request the service refuses, with its HTTP status, a stable code and a message for people."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class ErrorBody(BaseModel):
    """Every error the service returns, on every route."""

    error: str = Field(description="what went wrong and what was expected, for people")
    code: str = Field(description="stable machine-readable code, e.g. `image_too_large`, `queue_full`")
    request_id: str | None = Field(None, description="the request's X-Request-ID, also in the access log")


def _doc(description: str) -> dict:
    return {"model": ErrorBody, "description": description}


ERROR_RESPONSES = {
    400: _doc("bad request: empty body, corrupt or truncated image, malformed tensor (`bad_request`, "
              "`empty_body`, `corrupt_image`, `invalid_tensor`)"),
    401: _doc("missing or wrong API key (`unauthorized`)"),
    413: _doc("body larger than --max-body-bytes (`body_too_large`) or image with more pixels than --max-pixels "
              "(`image_too_large`)"),
    415: _doc("not an image, or a format the service does not read (`unsupported_media_type`)"),
    422: _doc("invalid query parameter (`validation_error`)"),
    503: _doc("queue full (`queue_full`, with Retry-After) or not ready yet (`not_ready`)"),
    504: _doc("the request's deadline (--timeout-ms) passed before inference finished (`deadline_exceeded`)"),
}


def error_response(request: Request, status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    body = ErrorBody(error=message, code=code, request_id=request_id).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return error_response(request, exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return error_response(request, 422, "validation_error", problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(request, exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # A bug, never bad input: log the trace, answer without it.
        log.exception("internal error", extra={"event": "error", "request_id": getattr(request.state,
                                                                                         "request_id", None)})
        return error_response(request, 500, "internal_error", "internal server error (see the server log)")
