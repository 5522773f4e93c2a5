"""Shared tornado handler behaviour: JSON bodies, errors, SSE, cancellation."""

from __future__ import annotations

import functools
import hmac
import inspect
import json
import logging
import uuid
from collections.abc import Callable
from contextlib import aclosing
from typing import Any, ClassVar, Protocol

from tornado.ioloop import IOLoop
from tornado.iostream import StreamClosedError
from tornado.web import HTTPError, stream_request_body

from exo_lab.api import common
from exo_lab.api.errors import ApiError
from exo_lab.api.events import collect, events
from exo_lab.api.forward import FORWARDED, forward, requested_model
from exo_lab.api.guard import browser_problem, is_json, not_json
from exo_lab.api.registry import ModelRegistry
from exo_lab.api.reply import Reply
from exo_lab.api.schema import RequestModel, parse_json_object
from exo_lab.cluster.auth import HEADER_SIG, header_problem
from exo_lab.cluster.signed_handler import SignedHandler
from exo_lab.engine.generation import Generation

log = logging.getLogger(__name__)

#: the request header that asks for a trace of the request (any value but ``0``, ``false``, ``no``, ``off``);
#: see :mod:`exo_lab.api.traces`
TRACE_HEADER = "X-Exo-Trace"
#: the answer's header naming the trace recorded (``GET /v1/traces/{id}`` once the answer has ended)
TRACE_ID_HEADER = "X-Exo-Trace-Id"


def wants_trace(headers: Any) -> bool:
    """Whether a request asks for a trace (:data:`TRACE_HEADER`)."""
    value = headers.get(TRACE_HEADER)
    return value is not None and value.strip().lower() not in ("", "0", "false", "no", "off")


def presented_key(headers: Any) -> str | None:
    """The API key a request carries: ``Authorization: Bearer KEY`` or ``x-api-key: KEY``."""
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("x-api-key") or headers.get("api-key")


def key_matches(expected: str, headers: Any) -> bool:
    """Whether either header carries ``expected`` (constant-time comparison)."""
    auth = headers.get("Authorization", "")
    candidates = [auth[7:].strip()] if auth[:7].lower() == "bearer " else []
    candidates += [v for v in (headers.get("x-api-key"), headers.get("api-key")) if v]
    want = expected.encode()
    return any(hmac.compare_digest(c.encode(), want) for c in candidates)


#: the HTTP methods whose handlers run only once the request is judged whole (see :func:`_judged_first`)
_METHODS = ("get", "post", "put", "patch", "delete")


def _judged_first(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` (a handler's ``get``/``post``/...), run only if the request, its body now in, is admitted:
    a request that came with signature headers is checked whole here (the signature covers the body)."""

    @functools.wraps(method)
    async def run(self: ApiHandler, *args: Any, **kwargs: Any) -> None:
        if not self.judge_whole():
            return
        result = method(self, *args, **kwargs)
        if inspect.isawaitable(result):
            await result

    run.judged_first = True  # type: ignore[attr-defined]
    return run


@stream_request_body
class ApiHandler(SignedHandler):
    """Base for API handlers: parses JSON, renders ApiError, checks the API key, cancels on disconnect.

    ``family`` picks the error shape: ``openai``, ``anthropic``, ``ollama``, or
    ``auto`` (Anthropic's when the client sends ``anthropic-version``, else OpenAI's).
    The answer to a request signed with the cluster key (another member, the Jupyter panel) is signed.

    Authentication comes before the body: :meth:`prepare` sees the headers only (the body streams in
    afterwards, :meth:`data_received`), so a request without the API key, or refused by a keyless loopback
    server's guards, is answered (401, 421, 403, 415) before a byte of its body is read, and the connection
    closed. A request with signature headers that may be good (present, fresh) is let in to send its body, and
    judged whole before its handler runs (:meth:`judge_whole`: the signature covers the body).
    """

    registry: ModelRegistry
    family = "openai"
    auth_required = True
    #: the model a POST body must follow (also its schema in ``/openapi.json``)
    schema: ClassVar[type[RequestModel] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _METHODS:
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "judged_first", False):
                setattr(cls, name, _judged_first(method))

    def initialize(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.generation: Generation | None = None
        self.client_gone = False
        self.on_gone: Callable[[], None] | None = None  # what to stop when the client goes (a forwarded request)
        self._signed: bool | None = None  # signed_by_cluster(), once known
        self._signature_pending = False  # signature headers seen, the body not judged yet
        self._body = bytearray()

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")
        if self.family == "anthropic":
            self.set_header("request-id", f"req_{uuid.uuid4().hex[:24]}")

    def data_received(self, chunk: bytes) -> None:
        self._body += chunk

    def signed_by_cluster(self) -> bool:
        """Whether the request carries a valid signature with the cluster key (another member sent it).

        Checked once per request, with its whole body (a signature's nonce counts as used once it is verified)."""
        if self._signed is None:
            verifier = self.settings.get("verifier")
            r = self.request
            self._signed = verifier is not None and HEADER_SIG in r.headers and self.signature_problem(verifier) is None
        return self._signed

    def prepare(self) -> None:
        """Before the body is read: a keyless loopback server's checks against web pages (:mod:`exo_lab.api.guard`),
        then the API key; a request with signature headers that may be good waits for its body
        (:meth:`judge_whole`)."""
        self.request.body = b""
        verifier = self.settings.get("verifier")
        headers = self.request.headers
        if verifier is not None and HEADER_SIG in headers and header_problem(dict(headers), verifier.window_s) is None:
            self._signature_pending = True
            return
        self._signed = False  # no signature, or one already known to be bad: judged as unsigned
        self.admit_unsigned()

    def judge_whole(self) -> bool:
        """With the body in: check a pending signature (a bad one is judged as unsigned); whether to go on."""
        self.request.body = bytes(self._body)
        if self._finished:
            return False
        if not self._signature_pending:
            return True
        self._signature_pending = False
        if self.signed_by_cluster():
            return True
        self.admit_unsigned()
        return not self._finished

    def admit_unsigned(self) -> None:
        """The checks of a request not signed by the cluster: the guards, then the API key (answered if it fails)."""
        if self.settings.get("browser_guard") and not self._guard_passed():
            return
        key = self.settings.get("api_key")
        if key and self.auth_required and not key_matches(key, self.request.headers) and not self.signed_by_cluster():
            given = presented_key(self.request.headers)
            why = "No API key was sent" if not given else "The API key is not valid"
            how = (
                "send it as 'x-api-key: KEY'"
                if self.error_family() == "anthropic"
                else "send it as 'Authorization: Bearer KEY'"
            )
            self.send_api_error(
                ApiError(
                    401,
                    f"{why}: this server requires its API key; {how}.",
                    type="invalid_request_error",
                    code="invalid_api_key",
                )
            )

    def _guard_passed(self) -> bool:
        """Host and Origin must be loopback's, a POST body JSON; else answer 421, 403 or 415 (False)."""
        headers = self.request.headers
        err = browser_problem(headers.get("Host"), headers.get("Origin"))
        if err is None and self.request.method == "POST" and not is_json(headers.get("Content-Type")):
            err = not_json(headers.get("Content-Type"))
        if err is not None and not self.signed_by_cluster():
            self.send_api_error(err)
            return False
        return True

    def json_body(self) -> dict[str, Any]:
        return parse_json_object(self.request.body)

    def body(self) -> Any:
        """The request body validated by :attr:`schema` (400 when it does not follow it)."""
        assert self.schema is not None, f"{type(self).__name__} declares no request schema"
        return self.schema.parse(self.json_body())

    def send_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data))

    def error_family(self) -> str:
        if self.family == "auto":
            return "anthropic" if "anthropic-version" in self.request.headers else "openai"
        return self.family

    def render_error(self, err: ApiError) -> dict[str, Any]:
        """The error body in this API's shape."""
        return err.render(self.error_family())

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
        self.finish(json.dumps(self.render_error(ApiError(status_code, message or "error", type=kind))))

    def on_connection_close(self) -> None:
        self.client_gone = True
        if self.generation is not None:
            self.generation.cancel()
        if self.on_gone is not None:
            self.on_gone()

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

    async def send_line(self, data: Any) -> bool:
        """Write one NDJSON line; False when the client has gone (generation cancelled)."""
        if self.client_gone:
            return False
        try:
            self.write(json.dumps(data) + "\n")
            await self.flush()
        except StreamClosedError:
            self.on_connection_close()
            return False
        return True


def _route_owner(control: Any, model: str) -> dict[str, Any] | None:
    """The owner serving ``model`` elsewhere (``{"api", "coordinator"?}``), from a Control that may only ``route``."""
    if hasattr(control, "route_owner"):
        return control.route_owner(model)
    url = control.route(model)
    return {"api": url} if url else None


class ParseRequest(Protocol):
    def __call__(self, req: Any, registry: ModelRegistry) -> Reply: ...


class GenerationHandler(ApiHandler):
    """``POST`` for every family: body -> :attr:`schema` -> the family's :class:`Reply` (``parse``) -> submit
    -> events -> its answer.

    Errors before generation are answered in the family's shape (400 / 404 / 429 / 503);
    a client that goes away cancels the generation.
    """

    parse: ClassVar[ParseRequest]

    async def forwarded(self) -> bool:
        """Forward the request when another member of the cluster serves its model (see :mod:`exo_lab.api.forward`)."""
        control = self.settings.get("control")
        if control is None or FORWARDED in self.request.headers:
            return False
        model = requested_model(self.request.body)
        if model is None or model in self.registry.names():
            return False
        owner = await IOLoop.current().run_in_executor(None, _route_owner, control, model)
        if owner is None:
            return False
        target = owner.get("coordinator") or None
        await forward(self, owner["api"], self.settings.get("cluster_key"), target, self.settings.get("node_id"))
        return True

    async def post(self) -> None:
        try:
            if await self.forwarded():
                return
            reply = type(self).parse(self.body(), self.registry)
            if reply.request is None:
                self.send_json(reply.immediate())
                return
        except ApiError as err:
            self.send_api_error(err)
            return
        self._trace: Any = None
        if wants_trace(self.request.headers):  # every rank records while this request runs
            rec = await IOLoop.current().run_in_executor(None, reply.backend.trace_begin, "api")
            self._trace = (reply.backend, rec)
            self.set_header(TRACE_ID_HEADER, rec.id)
        try:
            await self.generate(reply)
        finally:
            await self.end_trace()

    async def end_trace(self) -> None:
        """End this request's trace (once), before its answer ends: its id is readable when the client has it."""
        if self._trace is not None:
            backend, rec = self._trace
            self._trace = None
            await IOLoop.current().run_in_executor(None, backend.trace_end, rec)

    async def generate(self, reply: Reply) -> None:
        """Submit the parsed request and answer it."""
        assert reply.request is not None  # a reply without a request was answered at once
        try:
            self.generation = common.submit(reply.backend, reply.request)
        except ApiError as err:
            self.send_api_error(err)
            return
        if self.client_gone:
            self.generation.cancel()
        stream = events(self.generation, reply.tools, reply.reasoning)
        if not reply.stream:
            out = await collect(stream)
            await self.end_trace()
            if self.client_gone:
                return
            if out.final.error:
                self.send_api_error(reply.failure(out.final.error))
            else:
                self.send_json(reply.complete(out))
            return
        if reply.framing == "ndjson":
            self.set_header("Content-Type", "application/x-ndjson")
        else:
            self.start_sse()
        async with aclosing(stream), aclosing(reply.frames(stream)) as frames:
            async for name, data in frames:
                sent = await (self.send_line(data) if reply.framing == "ndjson" else self.send_sse(data, name))
                if not sent:
                    return
        await self.end_trace()
        if not self.client_gone:
            self.finish()


class NotFoundHandler(ApiHandler):
    """Any unknown path: a 404 in the shape of the family the path belongs to."""

    def error_family(self) -> str:
        path = self.request.path
        if path.startswith(("/api/", "/ollama/")):
            return "ollama"
        if path.startswith("/v1/messages"):
            return "anthropic"
        return "anthropic" if "anthropic-version" in self.request.headers else "openai"

    def prepare(self) -> None:
        super().prepare()
        if self._signature_pending:  # no handler will judge the body: refused like an unsigned request
            self._signature_pending, self._signed = False, False
            self.admit_unsigned()
        if not self._finished:
            self.send_api_error(ApiError(404, f"Unknown path {self.request.path}.", code="not_found"))
