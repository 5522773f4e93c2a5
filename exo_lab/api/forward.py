"""Forward a generation request to the API of the coordinator that serves its model.

Any member's API answers for every model of the cluster: a request for a model this server does
not hold is sent on, body untouched and signed with the cluster key, to the API of the instance's
owner; its answer (status, headers, and the body as it streams: SSE or NDJSON) is passed back
as it arrives. A forwarded request carries ``X-Exo-Lab-Forwarded`` and is never forwarded again.
When the owner cannot be reached the caller gets a 503 in its own API family; when the owner stops
answering midway through a stream, the stream ends with the family's error frame (never as if complete).

The request is signed for the owner's coordinator id (``X-Exo-Lab-Target``; its API refuses one signed for
another coordinator). The owner signs its answer (:mod:`exo_lab.cluster.signed_handler`): a streamed answer over its status
(the streamed body itself is not authenticated), a whole answer over its body too; a whole answer is
therefore held until it is complete and checked before it is passed on. An answer that is not the
owner's gets a 502.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.httputil import HTTPHeaders, parse_response_start_line

from exo_lab.api.errors import ApiError
from exo_lab.cluster.auth import HEADER_NONCE, HEADER_RESPONSE_SIG, response_is_authentic, sign_headers

log = logging.getLogger(__name__)

FORWARDED = "X-Exo-Lab-Forwarded"
#: request headers passed on (the rest, the API key above all, stay here)
PASS_REQUEST = ("Content-Type", "anthropic-version", "anthropic-beta", "Accept")
#: response headers passed back
PASS_RESPONSE = ("Content-Type", "Cache-Control", "Retry-After", "request-id", "X-Accel-Buffering")


def requested_model(body: bytes) -> str | None:
    """The ``model`` a JSON body asks for (None when it is not a JSON object with a string ``model``)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) and model else None


async def forward(
    handler: Any, api_url: str, cluster_key: str | None, target: str | None = None, source: str | None = None
) -> None:
    """Send ``handler``'s request to ``api_url`` and relay the answer (raises ApiError 503 if none comes).

    ``target``: the id of the coordinator serving there (the request is signed for it only, so a relay cannot
    pass it on to another member's API); ``source``: this coordinator's id."""
    req = handler.request
    body = req.body or b""
    headers = {k: req.headers[k] for k in PASS_REQUEST if k in req.headers}
    headers[FORWARDED] = "1"
    nonce = None
    if cluster_key:
        headers.update(sign_headers(cluster_key, req.method, req.uri, body, target=target, source=source))
        nonce = headers[HEADER_NONCE]
    started = False
    status: list[int] = []
    got: HTTPHeaders = HTTPHeaders()
    held: list[bytes] | None = None  # a whole (not streamed) signed answer, until it is checked

    def begin() -> None:
        nonlocal started
        handler.set_status(status[0])
        for name in PASS_RESPONSE:
            if name in got:
                handler.set_header(name, got[name])
        started = True

    def on_header(line: str) -> None:
        nonlocal held
        if not status:
            if line.startswith("HTTP/"):
                status.append(parse_response_start_line(line.strip()).code)
            return
        if line.strip():
            got.parse_line(line)
            return
        if status[0] == 100:  # 100 Continue: the real status line follows
            status.clear()
            return
        if (
            cluster_key
            and nonce
            and not response_is_authentic(cluster_key, nonce, status[0], None, got.get(HEADER_RESPONSE_SIG))
        ):
            held = []  # not signed as a stream: check the whole body before passing it on
            return
        begin()

    def on_chunk(chunk: bytes) -> None:
        if held is not None:
            held.append(chunk)
            return
        if handler.client_gone:
            return
        handler.write(chunk)
        handler.flush()

    client = AsyncHTTPClient(force_instance=True)
    handler.on_gone = client.close  # the client left: drop the upstream connection, the owner cancels
    try:
        await client.fetch(
            HTTPRequest(
                api_url.rstrip("/") + req.uri,
                method=req.method,
                body=body if req.method != "GET" else None,
                headers=headers,
                header_callback=on_header,
                streaming_callback=on_chunk,
                connect_timeout=5.0,
                request_timeout=3600.0,
                decompress_response=False,
            ),
            raise_error=False,
        )
    except (HTTPClientError, OSError) as exc:  # raise_error=False still raises for 599 (no answer, or cut off)
        if not started:
            raise _unreachable(api_url, exc) from exc
        broken = _broken_frame(handler, got.get("Content-Type", ""), api_url, exc)
        if broken and not handler.client_gone and not handler._finished:
            handler.write(broken)  # the stream was cut: end it with an error, not as if it were complete
    finally:
        client.close()
    if held is not None and not started and status:
        whole, sig = b"".join(held), got.get(HEADER_RESPONSE_SIG)
        authentic = bool(cluster_key and nonce and response_is_authentic(cluster_key, nonce, status[0], whole, sig))
        if not authentic and (status[0] != 401 or sig):  # an unsigned 401: the owner refusing our signature
            raise _unreachable(api_url, "its answer is not authentic", 502)
        begin()
        if not handler.client_gone:
            handler.write(whole)
    if not started:
        raise _unreachable(api_url, "no answer")
    if not handler.client_gone and not handler._finished:
        handler.finish()


def _broken_frame(handler: Any, content_type: str, api_url: str, why: object) -> str | None:
    """The family's streamed error frame for an answer the owner stopped sending midway (None: not a stream)."""
    err = ApiError(
        502,
        f"the instance's owner {api_url} stopped answering mid-stream ({why}); the answer is incomplete",
        type="server_error",
        code="owner_lost",
    )
    if "ndjson" in content_type:
        return json.dumps(err.ollama()) + "\n"
    if "event-stream" not in content_type:
        return None
    family = handler.error_family()
    if family == "anthropic":
        return f"event: error\ndata: {json.dumps(err.anthropic())}\n\n"
    if handler.request.path.rstrip("/").endswith("/responses"):
        data = {"type": "error", "code": err.code, "message": err.message, "param": None}
        return f"event: error\ndata: {json.dumps(data)}\n\n"
    return f"data: {json.dumps(err.openai())}\n\n"


def _unreachable(api_url: str, why: object, status: int = 503) -> ApiError:
    return ApiError(
        status,
        f"the instance serving this model is owned by {api_url}, which cannot be reached now ({why}); retry, or "
        "launch the model on this node.",
        type="server_error",
        code="owner_unreachable",
        headers={"Retry-After": "2"},
    )
