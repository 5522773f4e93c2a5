"""The tornado application that serves every API family on one port."""

from __future__ import annotations

import logging

import tornado.web

from exo_lab.api import embeddings, ollama_meta
from exo_lab.api.base import NotFoundHandler
from exo_lab.api.control import (
    ClusterControl,
    EventsHandler,
    InstanceHandler,
    InstancesHandler,
    LaunchHandler,
    PreviewsHandler,
    StateHandler,
)
from exo_lab.api.handlers import (
    ChatCompletionsHandler,
    CompletionsHandler,
    CountTokensHandler,
    MessagesHandler,
    ResponsesHandler,
)
from exo_lab.api.info import HealthHandler, ModelHandler, ModelsHandler
from exo_lab.api.openapi import OpenApiHandler
from exo_lab.api.registry import ModelRegistry
from exo_lab.api.traces import TraceHandler, TracesHandler
from exo_lab.cluster.auth import Verifier

access_log = logging.getLogger("tornado.access")


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Access log: server errors at ERROR; client mistakes (4xx) and the rest at INFO, so they never flood a console."""
    status = handler.get_status()
    level = logging.ERROR if status >= 500 else logging.INFO
    if access_log.isEnabledFor(level):
        access_log.log(
            level, "%d %s %.2fms", status, handler._request_summary(), 1000.0 * handler.request.request_time()
        )


def make_app(
    registry: ModelRegistry,
    topology_source=None,
    api_key: str | None = None,
    control: ClusterControl | None = None,
    cluster_key: str | None = None,
    browser_guard: bool = False,
    node_id: str | None = None,
) -> tornado.web.Application:
    """Routes for ``registry``'s models; ``topology_source()`` gives the cluster's topology for previews.

    With ``api_key``, every route but ``/health`` and Ollama's ``GET /`` needs
    it (``Authorization: Bearer KEY`` or ``x-api-key: KEY``); a request signed with ``cluster_key``
    (another member of the cluster forwarding or stopping) needs no API key. With ``control`` (a
    cluster member), instances are managed over HTTP and models served elsewhere in the cluster are
    forwarded there (:mod:`exo_lab.api.forward`). ``browser_guard`` (a loopback server without a key) refuses
    what only web pages send: a Host that is not loopback, another site's Origin, a POST body not declared
    JSON (:mod:`exo_lab.api.guard`). ``node_id``: this coordinator's id (``ClusterClient.owner()``): a request
    signed for another coordinator is refused, and forwarded requests are signed as coming from it.
    """
    kw = {"registry": registry}
    return tornado.web.Application(
        [
            (r"/v1/chat/completions", ChatCompletionsHandler, kw),
            (r"/v1/completions", CompletionsHandler, kw),
            (r"/v1/responses", ResponsesHandler, kw),
            (r"/v1/messages", MessagesHandler, kw),
            (r"/v1/messages/count_tokens", CountTokensHandler, kw),
            (r"/v1/models", ModelsHandler, kw),
            (r"/v1/models/(.+)", ModelHandler, kw),
            (r"/v1/traces", TracesHandler, kw),
            (r"/v1/traces/([^/]*)", TraceHandler, kw),
            (r"/health", HealthHandler, kw),
            (r"/openapi.json", OpenApiHandler, kw),
            (r"/instance/previews", PreviewsHandler, {**kw, "topology_source": topology_source}),
            (r"/instance", LaunchHandler, kw),
            (r"/instances", InstancesHandler, kw),
            (r"/instance/([0-9a-zA-Z_-]+)", InstanceHandler, kw),
            (r"/state", StateHandler, kw),
            (r"/events", EventsHandler, kw),
            *ollama_meta.routes(kw),
            *embeddings.routes(kw),
        ],
        default_handler_class=NotFoundHandler,
        default_handler_args=kw,
        compress_response=False,
        log_function=log_request,
        api_key=api_key or None,
        control=control,
        cluster_key=cluster_key,
        verifier=Verifier(cluster_key, node_id=node_id) if cluster_key else None,
        node_id=node_id,
        browser_guard=browser_guard,
    )
