"""``GET /v1/models`` and ``GET /health``."""

from __future__ import annotations

from exo_lab import __version__
from exo_lab.api.base import ApiHandler
from exo_lab.api.errors import ApiError


class ModelsHandler(ApiHandler):
    """``GET /v1/models``: the served models, in OpenAI's list shape."""

    def get(self) -> None:
        data = [
            {"id": name, "object": "model", "created": backend.created, "owned_by": "exo_lab"}
            for name, backend in self.registry.items()
        ]
        self.send_json({"object": "list", "data": data})


class ModelHandler(ApiHandler):
    """``GET /v1/models/{id}``."""

    def get(self, name: str) -> None:
        try:
            backend = self.registry.get(name)
        except ApiError as err:
            self.send_api_error(err)
            return
        self.send_json({"id": name, "object": "model", "created": backend.created, "owned_by": "exo_lab"})


class HealthHandler(ApiHandler):
    """``GET /health``: liveness and the models served."""

    def get(self) -> None:
        self.send_json({"status": "ok", "version": __version__, "models": self.registry.names()})
