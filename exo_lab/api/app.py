"""The tornado application that serves every API family on one port."""

from __future__ import annotations

import tornado.web

from exo_lab.api.base import NotFoundHandler
from exo_lab.api.info import HealthHandler, ModelHandler, ModelsHandler
from exo_lab.api.openai_chat import ChatCompletionsHandler
from exo_lab.api.registry import ModelRegistry


def make_app(registry: ModelRegistry, topology_source=None) -> tornado.web.Application:
    """Routes for ``registry``'s models; ``topology_source()`` gives the cluster's topology for previews."""
    from exo_lab.api.previews import PreviewsHandler

    kw = {"registry": registry}
    return tornado.web.Application(
        [
            (r"/v1/chat/completions", ChatCompletionsHandler, kw),
            (r"/v1/models", ModelsHandler, kw),
            (r"/v1/models/(.+)", ModelHandler, kw),
            (r"/health", HealthHandler, kw),
            (r"/instance/previews", PreviewsHandler, {**kw, "topology_source": topology_source}),
        ],
        default_handler_class=NotFoundHandler,
        default_handler_args=kw,
        compress_response=False,
    )
