"""``GET /v1/models`` (for OpenAI and Anthropic clients alike) and ``GET /health``."""

from __future__ import annotations

import time
from typing import Any

from exo_lab import __version__
from exo_lab.api.base import ApiHandler
from exo_lab.api.errors import ApiError


def rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def model_object(name: str, backend: Any) -> dict[str, Any]:
    """One model, with OpenAI's fields and Anthropic's side by side."""
    return {
        "id": name,
        "object": "model",
        "created": backend.created,
        "owned_by": "exo_lab",
        "type": "model",
        "display_name": name,
        "created_at": rfc3339(backend.created),
    }


def remote_model_object(instance: dict[str, Any]) -> dict[str, Any]:
    """A model another member of the cluster serves (an instance from ``GET /instances``)."""
    created = int(instance.get("created") or time.time())
    return {
        "id": instance["name"],
        "object": "model",
        "created": created,
        "owned_by": "exo_lab",
        "type": "model",
        "display_name": instance["name"],
        "created_at": rfc3339(created),
    }


class ModelsHandler(ApiHandler):
    """``GET /v1/models``: OpenAI's list (``object``, ``data``) and Anthropic's page (``has_more``, ids)."""

    family = "auto"

    def get(self) -> None:
        data = [model_object(name, backend) for name, backend in self.registry.items()]
        control = self.settings.get("control")
        if control is not None:  # the cluster's other models, served by other members (forwarded there)
            data += [remote_model_object(i) for i in control.models()]
            data.sort(key=lambda m: m["id"])
        after = self.get_query_argument("after_id", None)
        before = self.get_query_argument("before_id", None)
        ids = [m["id"] for m in data]
        if after in ids:
            data = data[ids.index(after) + 1 :]
        elif before in ids:
            data = data[: ids.index(before)]
        limit = self.get_query_argument("limit", None)
        has_more = False
        if limit is not None:
            try:
                n = int(limit)
            except ValueError:
                n = 0
            if not 1 <= n <= 1000:
                self.send_api_error(
                    ApiError(400, f"'limit' must be an integer from 1 to 1000, got {limit!r}.", param="limit")
                )
                return
            has_more = len(data) > n
            data = data[:n]
        self.send_json(
            {
                "object": "list",
                "data": data,
                "has_more": has_more,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )


class ModelHandler(ApiHandler):
    """``GET /v1/models/{id}``."""

    family = "auto"

    def get(self, name: str) -> None:
        control = self.settings.get("control")
        remote = [i for i in control.models() if i["name"] == name] if control is not None else []
        if remote and name not in self.registry.names():
            self.send_json(remote_model_object(remote[0]))
            return
        try:
            backend = self.registry.get(name)
        except ApiError as err:
            self.send_api_error(err)
            return
        self.send_json(model_object(name, backend))


class HealthHandler(ApiHandler):
    """``GET /health``: liveness and the models served (open even with an API key)."""

    auth_required = False

    def get(self) -> None:
        self.send_json({"status": "ok", "version": __version__, "models": self.registry.names()})
