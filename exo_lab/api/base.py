"""Shared tornado handler behaviour: JSON bodies, errors, SSE, cancellation."""

from __future__ import annotations

import json
import logging
from typing import Any

from tornado.iostream import StreamClosedError
from tornado.web import HTTPError, RequestHandler

from exo_lab.api.errors import ApiError
from exo_lab.api.fields import parse_json_object
from exo_lab.api.registry import ModelRegistry
from exo_lab.engine.generator import Generation

log = logging.getLogger(__name__)


class ApiHandler(RequestHandler):
    """Base for API handlers: parses JSON, renders ApiError, cancels on disconnect."""

    registry: ModelRegistry

    def initialize(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.generation: Generation | None = None
        self.client_gone = False

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")

    def json_body(self) -> dict[str, Any]:
        return parse_json_object(self.request.body)

    def send_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data))

    def render_error(self, err: ApiError) -> dict[str, Any]:
        """The error body in this API's shape (OpenAI's by default)."""
        return err.openai()

    def send_api_error(self, err: ApiError) -> None:
        if self._finished:
            return
        self.clear()
        for k, v in err.headers.items():
            self.set_header(k, v)
        self.send_json(self.render_error(err), err.status)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Tornado's own errors (405, unexpected exceptions) in the API's shape."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        elif status_code == 405:
            message = f"Method {self.request.method} is not allowed on {self.request.path}."
        elif status_code >= 500:
            message = "Internal server error; the server logged the details."
        else:
            message = self._reason
        kind = "server_error" if status_code >= 500 else "invalid_request_error"
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(self.render_error(ApiError(status_code, message, type=kind))))

    def on_connection_close(self) -> None:
        self.client_gone = True
        if self.generation is not None:
            self.generation.cancel()

    # SSE
    def start_sse(self) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")

    async def send_sse(self, data: Any, event: str | None = None) -> bool:
        """Write one SSE event; False when the client has gone (generation cancelled)."""
        if self.client_gone:
            return False
        payload = data if isinstance(data, str) else json.dumps(data)
        text = (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"
        try:
            self.write(text)
            await self.flush()
        except StreamClosedError:
            self.on_connection_close()
            return False
        return True


class NotFoundHandler(ApiHandler):
    """Any unknown path: a 404 in OpenAI's error shape."""

    def prepare(self) -> None:
        self.send_api_error(ApiError(404, f"Unknown path {self.request.path}.", code="not_found"))
