"""What every dashboard session shows, shared per process: a cluster (or a fixed topology, or this machine),
the models served here, the cluster's instances, plans being launched and bench results. A thread of its own
refreshes it (never a session's event loop: reading the agents takes network round trips).

With a cluster, launching and stopping go through the cluster's :class:`~exo_lab.control.Control`, the one
that also serves its API: an instance launched from a notebook, this dashboard, the JupyterLab panel or
HTTP shows up here and can be stopped here, and the other way round."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import weakref
from pathlib import Path
from typing import Any, cast

from exo_lab.api.errors import ApiError
from exo_lab.cluster.topology import NodeInfo, Topology
from exo_lab.engine.backend import Backend
from exo_lab.ui.dashboard.bench_view import bench_rows
from exo_lab.ui.dashboard.instance_rows import InstanceRow, merge_rows

log = logging.getLogger(__name__)


def machine_topology() -> Topology:
    """This machine as a one-node topology, measured in a child process (MLX stays out of this one)."""
    code = (
        "import json, exo_lab\nfrom exo_lab.placement.preview import this_machine\n"
        "print(json.dumps(this_machine().to_json()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"profiling this machine failed: {out.stderr.strip()[-500:]}")
    return Topology.from_json(json.loads(out.stdout.strip().splitlines()[-1]))


def error_text(exc: BaseException) -> str:
    """An error as the page shows it: an API error's own message, anything else with its type."""
    return exc.message if isinstance(exc, ApiError) else f"{type(exc).__name__}: {exc}"


class DashboardSource:
    """What every dashboard session shows: a cluster (or a fixed topology, or this machine), models, bench results.

    ``cluster``: an :class:`exo_lab.Cluster` (refreshed every ``refresh_s`` seconds; every instance of the
    cluster is listed, plans can be launched and instances stopped). ``control``: the cluster's
    :class:`~exo_lab.control.Control`; without one, the cluster is served (:meth:`exo_lab.Cluster.serve`,
    which is idempotent) and its control used, so that the dashboard, the API and the notebook share it.
    ``topology``: a fixed topology instead (a what-if spec). Neither: this machine, profiled in the
    background. ``registry``: the models served in this process (an API server's
    :class:`~exo_lab.api.registry.ModelRegistry`); they can be chatted with. ``api_url``: shown in the header
    (default: the cluster's API). ``bench``: a bench JSON document (or a path to one).
    """

    def __init__(
        self,
        cluster: Any = None,
        topology: Topology | None = None,
        registry: Any = None,
        api_url: str | None = None,
        bench: Any = None,
        refresh_s: float = 2.0,
        control: Any = None,
    ) -> None:
        if cluster is not None and control is None and hasattr(cluster, "serve"):
            cluster.serve()  # a no-op when it serves already (exo-lab up, a notebook that launched)
            control = cluster.control
        self.cluster = cluster
        self.control = control  # an exo_lab.control.Control: the cluster's instances, launched and stopped here
        self.registry = registry
        self.api_url = api_url or (getattr(cluster, "api_url", None) if cluster is not None else None)
        self.refresh_s = refresh_s
        self.mode = "cluster" if cluster is not None else "what-if" if topology is not None else "this machine"
        self._topology = cluster.topology if cluster is not None else topology
        self.version = 1 if self._topology is not None else 0
        self.error = ""
        self.bench: dict[str, Any] | list[Any] | None = None
        self.bench_version = 0
        if bench is not None:
            self.load_bench(bench)
        self.sessions: weakref.WeakSet[Any] = weakref.WeakSet()  # the open pages (app.Dashboard)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._kick = threading.Event()  # refresh now (after a launch or stop, on a cluster event)
        self._thread: threading.Thread | None = None
        self._unsubscribe: Any = None
        self.launches: dict[str, str] = {}  # plan description -> "launching…", "launched as NAME…", "launch failed: …"
        self.cluster_instances: list[dict[str, Any]] = []  # Control.instances(), refreshed on the thread
        self.stops: dict[str, str] = {}  # instance id -> "stopping…", "stopped", "stop failed: …"

    # lifecycle
    def start(self) -> DashboardSource:
        """Start the background refresh (idempotent)."""
        if self._thread is None and (self.cluster is not None or self.mode == "this machine"):
            if self.control is not None:  # a change the control's watch sees is shown at once, not a tick later
                self._unsubscribe = self.control.subscribe(lambda _event: self._kick.set())
            self._thread = threading.Thread(target=self._refresh_loop, name="exo-lab-dashboard-refresh", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._kick.set()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _set_topology(self, topo: Topology) -> None:
        with self._lock:
            if self._topology is None or topo.to_json() != self._topology.to_json():
                self._topology = topo
                self.version += 1

    def _refresh_loop(self) -> None:
        if self.cluster is None:
            try:
                self._set_topology(machine_topology())
            except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
                log.warning("%s", exc)
                self.error = str(exc)
                self._set_topology(Topology({"local": NodeInfo("local", socket.gethostname(), ["127.0.0.1"])}))
        if self.control is not None:
            self._refresh_instances()
        while not self._stop.is_set():
            self._kick.wait(self.refresh_s)
            self._kick.clear()
            if self._stop.is_set():
                break
            try:
                if self.cluster is not None:
                    self.cluster.refresh()
                    topo = self.cluster.topology
                else:
                    topo = self._with_live_memory()
            except Exception as exc:
                log.warning("dashboard refresh failed: %s", exc)
                self.error = f"refresh failed: {exc}"
                continue
            self.error = ""
            self._set_topology(topo)
            if self.control is not None:
                self._refresh_instances()

    def _refresh_instances(self) -> None:
        """Read every instance of the cluster from the agents (through the control)."""
        assert self.control is not None
        try:
            found = self.control.instances()
        except Exception as exc:
            log.warning("reading the cluster's instances failed: %s", exc)
            self.error = f"reading instances failed: {error_text(exc)}"
            return
        ids = {d["id"] for d in found} | {getattr(b, "id", None) for _, b in self.instances()}
        with self._lock:
            self.cluster_instances = found
            for iid, how in list(self.stops.items()):  # stopped and gone: nothing more to show about it
                if how == "stopped" and iid not in ids:
                    del self.stops[iid]

    def _with_live_memory(self) -> Topology:
        from exo_lab.cluster.profile import memory_now

        current = self._topology
        assert current is not None, "_refresh_loop sets this machine's topology before refreshing it"
        topo = Topology.from_json(current.to_json())
        total, available = memory_now()
        for node in topo.nodes.values():
            node.profile = {**node.profile, "memory_total_bytes": total, "memory_available_bytes": available}
        return topo

    # reads
    @property
    def topology(self) -> Topology | None:
        """The latest topology (None while this machine is still being profiled)."""
        return self._topology

    def instances(self) -> list[tuple[str, Backend]]:
        """``(name, backend)`` for each model served here and each instance of the cluster, in that order."""
        out: list[tuple[str, Backend]] = []
        if self.registry is not None:
            out += list(self.registry.items())
        if self.cluster is not None:
            seen = {id(b) for _, b in out}
            out += [(inst.name, inst) for inst in list(self.cluster.instances) if id(inst) not in seen]
        return out

    def rows(self) -> list[InstanceRow]:
        """Every instance, once: the models served here and the cluster's instances (see :mod:`.instance_rows`)."""
        with self._lock:
            cluster, stops = list(self.cluster_instances), dict(self.stops)
        return merge_rows(self.instances(), cluster, self._topology, stops, can_stop=self.control is not None)

    def instance_names(self) -> set[str]:
        """The names every instance of the cluster and every model served here go by."""
        return {r.name for r in self.rows()}

    def chat_models(self) -> dict[str, Backend]:
        """What the chat box can talk to: served models and ready instances."""
        return {name: obj for name, obj in self.instances() if obj.state == "ready"}

    def model_suggestions(self) -> list[str]:
        """Models to preview: those served here, cached ones and the synthetic presets."""
        from exo_lab.models import list_cached
        from exo_lab.models.synthetic import PRESETS

        names: list[str] = []
        for name, obj in self.instances():
            names.append(str(obj.path) if obj.path is not None else name)
        try:
            names += list_cached()
        except OSError:
            pass
        names += [f"synthetic:{p}" for p in PRESETS]
        return list(dict.fromkeys(names))

    def preview(
        self,
        model: str,
        context: int,
        prompt_tokens: int,
        objective: str,
        sharding: str | None = None,
        min_nodes: int | None = None,
    ) -> Any:
        """Ranked plans for ``model`` on the current topology (launchable when there is a cluster), only those of
        ``sharding`` (e.g. ``pipeline``) over at least ``min_nodes`` nodes.

        Like the API's previews, only for a model here (served, on disk, a what-if model, a synthetic preset):
        a page never makes this process download or build one (:mod:`exo_lab.models.local`)."""
        from exo_lab.placement.plan import strategies_for

        strategies = strategies_for(sharding)
        if self.control is not None:
            plans = self.control.previews(model, context=context, prompt_tokens=prompt_tokens, objective=objective)
        elif self.cluster is not None:
            plans = self.cluster.preview(
                model, context=context, prompt_tokens=prompt_tokens, objective=objective, download=False
            )
        else:
            from exo_lab.placement.preview import preview

            topo = self.topology
            if topo is None:
                raise RuntimeError("this machine is still being profiled; try again in a moment")
            plans = preview(topo, model, context, prompt_tokens, 1, objective, download=False)
        return plans.filtered(strategies, min_nodes)

    def launch(self, plan: Any, name: str | None = None, model: str | None = None) -> threading.Thread:
        """Launch ``plan`` of ``model`` (default: the model the plan was previewed for) through the cluster's
        control, on a thread; the instance then appears among the instances, with its progress."""
        control = self.control
        if control is None:
            raise RuntimeError("launching needs a live cluster: start the dashboard with --connect or --local N")
        key = plan.describe()
        ref = model or plan.model_ref or plan.model
        self.launches[key] = "launching…"

        def run() -> None:
            try:
                inst = control.launch(ref, plan=plan, name=name)
            except Exception as exc:
                log.warning("launching %s failed: %s", key, exc)
                self.launches[key] = f"launch failed: {error_text(exc)}"
            else:
                self.launches[key] = f"launched as {inst.name}: see Instances"
            self._kick.set()

        thread = threading.Thread(target=run, name="exo-lab-dashboard-launch", daemon=True)
        thread.start()
        return thread

    def stop(self, instance_id: str) -> threading.Thread:
        """Stop the instance ``instance_id`` of the cluster (wherever it was launched) on a thread;
        ``stops[instance_id]`` says how it goes."""
        control = self.control
        if control is None:
            raise RuntimeError("stopping instances needs a live cluster")
        self.stops[instance_id] = "stopping…"

        def run() -> None:
            try:
                control.delete(instance_id)
            except Exception as exc:
                log.warning("stopping %s failed: %s", instance_id, exc)
                self.stops[instance_id] = f"stop failed: {error_text(exc)}"
            else:
                self.stops[instance_id] = "stopped"
            self._kick.set()

        thread = threading.Thread(target=run, name="exo-lab-dashboard-stop", daemon=True)
        thread.start()
        return thread

    def load_bench(self, bench: Any) -> None:
        """Load bench results: a JSON document, its text or bytes, or a path to a file."""
        if isinstance(bench, (str, Path)) and not str(bench).lstrip().startswith(("{", "[")):
            bench = Path(bench).read_text()
        if isinstance(bench, bytes):
            bench = bench.decode()
        if isinstance(bench, str):
            bench = json.loads(bench)
        bench_rows(bench)  # raises ValueError when there is nothing to show: what passes is a dict or a list
        self.bench = cast("dict[str, Any] | list[Any]", bench)
        self.bench_version += 1
