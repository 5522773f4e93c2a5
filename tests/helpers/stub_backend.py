"""A backend for API tests of requests that never reach generation (auth, routing, request checks)."""

from __future__ import annotations

from exo_lab.engine.backend import Backend


class StubBackend(Backend):
    """Enough of a Backend for requests that never reach generation: it counts three tokens per chat."""

    tokenizer = None
    stats = {}

    def __init__(self, name: str = "stub") -> None:
        super().__init__(name)

    def chat_tokens(self, messages):
        return [1, 2, 3]

    def _check_open(self):
        raise RuntimeError("the stub does not generate")

    def _enqueue(self, gen):
        raise AssertionError("unreachable")

    def close(self):
        pass
