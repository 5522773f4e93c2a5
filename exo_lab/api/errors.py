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

    def anthropic(self) -> dict[str, Any]:
        """``{"type": "error", "error": {"type", "message"}}`` as Anthropic sends it."""
        kind = ANTHROPIC_TYPES.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def ollama(self) -> dict[str, Any]:
        """``{"error": "..."}`` as Ollama sends it."""
        return {"error": self.message}

    def render(self, family: str) -> dict[str, Any]:
        """The body in ``family``'s shape: ``openai``, ``anthropic`` or ``ollama``."""
        return {"anthropic": self.anthropic, "ollama": self.ollama}.get(family, self.openai)()


ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


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
