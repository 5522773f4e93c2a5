"""Traces over HTTP: ``GET /v1/traces`` (what is kept) and ``GET /v1/traces/{id}`` (one, as Chrome trace JSON).

A generation request (any family) records a trace when it carries the header ``X-Exo-Trace: 1``
(``TRACE_HEADER``): every rank's spans while it runs (other requests in flight meanwhile are in
it too), kept by its backend (its last :data:`~exo_lab.engine.backend.TRACE_HISTORY`). The answer
carries the trace's id in ``X-Exo-Trace-Id``; the trace is readable once the answer has ended.

``GET /v1/traces/{id}`` answers Chrome/Perfetto trace JSON (save it and open it in
https://ui.perfetto.dev); ``?format=exo`` answers exo_lab's own form (:meth:`Trace.to_json`: spans,
ranks with their clock offsets and uncertainties, the plan's predicted components). An id is 16
lowercase hex digits: anything else is a 400, an unknown id a 404.
"""

from __future__ import annotations

import re

from exo_lab.api.base import TRACE_HEADER, TRACE_ID_HEADER, ApiHandler
from exo_lab.api.errors import ApiError, bad_request

__all__ = ["TRACE_HEADER", "TRACE_ID_HEADER", "TraceHandler", "TracesHandler"]

_ID = re.compile(r"[0-9a-f]{16}")


class TracesHandler(ApiHandler):
    """``GET /v1/traces``: every kept trace of every model served here, newest first."""

    def get(self) -> None:
        out = []
        for name, backend in self.registry.items():
            out += [{**t.summary(), "model": name} for t in list(getattr(backend, "traces", ()))]
        out.sort(key=lambda t: t["started"], reverse=True)
        self.send_json({"object": "list", "data": out})


class TraceHandler(ApiHandler):
    """``GET /v1/traces/{id}``: Chrome trace JSON, or ``?format=exo``."""

    def get(self, trace_id: str) -> None:
        if not _ID.fullmatch(trace_id):
            self.send_api_error(bad_request("A trace id is 16 lowercase hex digits.", param="id", code="invalid_id"))
            return
        fmt = self.get_query_argument("format", "chrome")
        if fmt not in ("chrome", "exo"):
            self.send_api_error(bad_request("format is 'chrome' or 'exo'.", param="format"))
            return
        for _, backend in self.registry.items():
            trace = backend.find_trace(trace_id)
            if trace is not None:
                self.send_json(trace.to_chrome() if fmt == "chrome" else trace.to_json())
                return
        self.send_api_error(ApiError(404, f"No trace {trace_id} is kept here.", code="not_found"))
