"""A running instance at a glance: state, loading progress, tokens/s over time, recent requests.

:class:`InstanceMonitor` is an anywidget drawn in SVG/HTML (no external libraries). Python computes every
number; a sampler thread reads the instance every ``interval_s`` seconds and pushes a trait only when it
changed, so the front end never polls. The same snapshot functions feed the Panel dashboard.

What it reads from the watched :class:`~exo_lab.engine.backend.Backend`: ``name``, ``state``, ``error``,
``pending``, ``usage_history`` ((unix time, :class:`~exo_lab.engine.generation.Usage`) per finished request)
and ``requests_completed``; from an :class:`~exo_lab.instance.Instance` also ``plan``, ``progress`` (rank ->
(layers loaded, layers)) and ``replacements``. Any other backend (an :class:`~exo_lab.Engine`) reads as a
single-process model, loaded before it exists.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anywidget
import traitlets

from exo_lab.ui import topology_widget as tw

if TYPE_CHECKING:  # for annotations only: importing exo_lab.ui loads no MLX (see as_instance)
    from exo_lab.engine.backend import Backend
    from exo_lab.instance import Instance

log = logging.getLogger(__name__)

_STATIC = Path(__file__).parent / "static"
RECENT_REQUESTS = 50  # rows pushed to the front end (it shows the newest few); the chart uses them too


def as_instance(obj: Backend) -> Instance | None:
    """``obj`` when it is an :class:`~exo_lab.instance.Instance` (a plan over ranks), else None."""
    from exo_lab.instance import Instance  # here: exo_lab.ui imports no MLX, and a Backend's module already did

    return obj if isinstance(obj, Instance) else None


def instance_summary(obj: Backend) -> dict[str, Any]:
    """Name, state, error and the plan with its predictions (what the monitor's header and tiles show)."""
    inst = as_instance(obj)
    plan = inst.plan if inst is not None else None
    # an Instance's model is what it was launched from (a name, hub id or path); an Engine's .model is MLX's module
    model = inst.model if inst is not None else str(obj.path) if obj.path is not None else ""
    out: dict[str, Any] = {
        "name": obj.name,
        "model": model,
        "state": obj.state,
        "error": obj.error or "",
        "pending": obj.pending,  # requests decoding together or waiting
        "replacements": inst.replacements if inst is not None else 0,
        "plan": None,
    }
    out["busy"] = out["pending"] > 0
    if plan is not None:
        names = plan.node_names
        out["plan"] = {
            "description": plan.describe(),
            "strategy": plan.strategy,
            "backend": plan.backend,
            "nodes": [names.get(n, n) for n in plan.nodes],
            "ranks": len(plan.ranks),
            "decode_tps": plan.decode_tps,
            "ttft_s": plan.ttft_s,
            "prefill_tps": plan.prefill_tps,
            "prompt_tokens": plan.prompt_tokens,
        }
    return out


def loading_progress(obj: Backend) -> dict[str, Any]:
    """``{"done", "total", "ranks": [{"rank", "node", "layers", "done", "total"}]}``: layers loaded, per rank."""
    inst = as_instance(obj)
    if inst is None:  # a single-process engine: loaded before it exists
        return {"done": 1, "total": 1, "ranks": []}
    plan, progress = inst.plan, dict(inst.progress)
    names = plan.node_names
    ranks = []
    for r in sorted(plan.ranks, key=lambda r: r.rank):
        done, total = progress.get(r.rank, (0, max(1, r.layers[1] - r.layers[0])))
        ranks.append(
            {
                "rank": r.rank,
                "node": names.get(r.node_id, r.node_id),
                "layers": list(r.layers),
                "done": int(done),
                "total": int(total),
            }
        )
    done = sum(x["done"] for x in ranks)
    total = sum(x["total"] for x in ranks)
    return {"done": done, "total": total, "ranks": ranks}


def request_rows(obj: Backend, limit: int = RECENT_REQUESTS) -> list[dict[str, Any]]:
    """The newest ``limit`` finished requests, oldest first: time and :class:`Usage` fields."""
    history = list(obj.usage_history)[-limit:]
    rows = []
    for t, usage in history:
        rows.append(
            {
                "t": float(t),
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "ttft_s": usage.ttft_s,
                "prompt_tps": usage.prompt_tps,
                "generation_tps": usage.generation_tps,
                "total_s": usage.total_s,
            }
        )
    return rows


def request_stats(rows: list[dict[str, Any]], total: int | None = None) -> dict[str, Any]:
    """Totals and the latest/mean decode speed and TTFT over ``rows`` (requests that decoded 2+ tokens).

    ``total`` is the number of requests ever finished (``rows`` holds only the recent ones).
    """
    decoded = [r for r in rows if r["completion_tokens"] > 1 and r["generation_tps"] > 0]
    started = [r for r in rows if r["completion_tokens"] > 0]
    return {
        "requests": total if total is not None else len(rows),
        "tokens": sum(r["completion_tokens"] for r in rows),
        "last_decode_tps": decoded[-1]["generation_tps"] if decoded else None,
        "mean_decode_tps": sum(r["generation_tps"] for r in decoded) / len(decoded) if decoded else None,
        "last_ttft_s": started[-1]["ttft_s"] if started else None,
        "last_prompt_tps": started[-1]["prompt_tps"] if started else None,
    }


class InstanceMonitor(anywidget.AnyWidget):
    """State, loading progress, decode tokens/s over time and recent requests of an instance.

    ``InstanceMonitor(inst)`` starts a sampler thread (every ``interval_s`` seconds) that stops when the
    widget closes or when the instance has stopped; ``InstanceMonitor()`` with no instance just shows
    whatever is assigned to its traits.
    """

    _esm = _STATIC / "instance_monitor.js"
    _css = _STATIC / "instance_monitor.css"

    summary = traitlets.Dict().tag(sync=True)
    progress = traitlets.Dict().tag(sync=True)
    requests = traitlets.List(traitlets.Dict()).tag(sync=True)
    stats = traitlets.Dict().tag(sync=True)

    def __init__(self, instance: Backend | None = None, interval_s: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.instance = instance
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if instance is not None:
            self.sample()
            self._thread = threading.Thread(target=self._sample_loop, name="exo-lab-instance-monitor", daemon=True)
            self._thread.start()

    def sample(self) -> bool:
        """Read the instance now and push what changed; True when something did."""
        if self.instance is None:
            return False
        rows = request_rows(self.instance)
        new = {
            "summary": instance_summary(self.instance),
            "progress": loading_progress(self.instance),
            "requests": rows,
            "stats": request_stats(rows, self.instance.requests_completed),
        }
        changed = {k: v for k, v in new.items() if getattr(self, k) != v}  # k: a trait's name
        if changed:
            with self.hold_sync():
                for key, value in changed.items():
                    setattr(self, key, value)
        return bool(changed)

    @property
    def live(self) -> bool:
        """Whether the sampler thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def _sample_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception as exc:
                log.warning("instance monitor sample failed: %s", exc)
                continue
            if self.summary.get("state") == "stopped":
                return

    @traitlets.observe("comm")
    def _stop_on_comm_close(self, change: dict[str, Any]) -> None:
        if change["new"] is not None:
            change["new"].on_close(lambda _msg: self._stop_sampling())

    def _stop_sampling(self) -> None:
        # getattr: the comm opens inside super().__init__, so it can close before _stop and _thread exist
        stop, thread = getattr(self, "_stop", None), getattr(self, "_thread", None)
        if stop is not None:
            stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=max(5.0, 2 * self.interval_s))

    def close(self) -> None:
        """Stop sampling and close the widget."""
        self._stop_sampling()
        super().close()


def instance_mimebundle(instance: Instance, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The monitor for ``Instance._repr_mimebundle_``; None outside a kernel (``_repr_html_`` is the fallback)."""
    if not tw.in_widget_kernel():
        return None
    bundle = InstanceMonitor(instance)._repr_mimebundle_(**kwargs)
    if bundle is None:
        return None
    data, metadata = bundle if isinstance(bundle, tuple) else (bundle, {})
    return {**data, "text/plain": repr(instance), "text/html": instance._repr_html_()}, metadata
