"""API errors, raised by request parsing and rendered in each API's own shape."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A client-facing error: HTTP status, message, and where it came from."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def openai(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}`` as OpenAI sends it."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def model_not_found(model: str, available: list[str]) -> ApiError:
    listing = ", ".join(available) or "none"
    return ApiError(
        404,
        f"The model {model!r} does not exist on this server (available: {listing}).",
        param="model",
        code="model_not_found",
    )
