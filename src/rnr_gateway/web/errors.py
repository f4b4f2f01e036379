"""One error shape for every HTTP error: {"error": {"code", "message"}} (PROTOCOL §7)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def handle_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HttpError)
    return error_response(exc.status, exc.code, exc.message)


def not_found(what: str) -> HttpError:
    return HttpError(404, "not_found", f"{what} does not exist")


def invalid(message: str, code: str = "invalid_request") -> HttpError:
    return HttpError(422, code, message)
