"""The models an API server offers, by the id clients send as ``model``."""

from __future__ import annotations

import threading

from exo_lab.api.errors import model_not_found
from exo_lab.engine.backend import Backend

__all__ = ["Backend", "ModelRegistry"]


class ModelRegistry:
    """Thread-safe map from model id to backend."""

    def __init__(self) -> None:
        self._backends: dict[str, Backend] = {}
        self._lock = threading.Lock()

    def add(self, backend: Backend, name: str | None = None) -> str:
        name = name or backend.name
        with self._lock:
            self._backends[name] = backend
        return name

    def remove(self, name: str) -> Backend | None:
        with self._lock:
            return self._backends.pop(name, None)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._backends)

    def items(self) -> list[tuple[str, Backend]]:
        with self._lock:
            return sorted(self._backends.items())

    def get(self, name: str) -> Backend:
        """The backend for ``name``, or a 404 ApiError listing what exists."""
        with self._lock:
            backend = self._backends.get(name)
        if backend is None:
            raise model_not_found(name, self.names())
        return backend
