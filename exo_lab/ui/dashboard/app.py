"""The dashboard page: one browser session's sections assembled, and what ``panel serve`` calls per session.

A :class:`~exo_lab.ui.dashboard.source.DashboardSource` holds what every session shows; each session
(:class:`Dashboard`) copies what changed into its sections once a second, on its own loop.
"""

from __future__ import annotations

from typing import Any

import panel as pn

from exo_lab import defaults
from exo_lab.ui.dashboard.bench_view import BenchView
from exo_lab.ui.dashboard.chat import ChatView
from exo_lab.ui.dashboard.cluster_view import ClusterView
from exo_lab.ui.dashboard.header import HEADER_CSS, header_html
from exo_lab.ui.dashboard.instances_view import InstancesView
from exo_lab.ui.dashboard.plans_view import PlansView
from exo_lab.ui.dashboard.source import DashboardSource
from exo_lab.ui.dashboard.theme import PAGE_CSS
from exo_lab.workbench import connect

TICK_MS = 1000


class Dashboard:
    """One browser session's page: ``layout`` is the Panel object; :meth:`tick` copies what changed.

    Sections: ``cluster`` (graph and node table), ``chat``, ``instances``, ``plans`` (placement preview),
    ``bench``; ``header`` is the bar on top.
    """

    def __init__(self, source: DashboardSource) -> None:
        self.source = source
        self.header = pn.pane.HTML("", stylesheets=[HEADER_CSS], sizing_mode="stretch_width", margin=0)
        self.cluster = ClusterView()
        self.chat = ChatView(source)
        self.instances = InstancesView(source)
        self.plans = PlansView(source)
        self.bench = BenchView(source)
        self.layout = self._layout()
        self.tick()
        source.sessions.add(self)

    def _layout(self) -> pn.Column:
        def row(*cards: Any, margin: tuple[int, ...] = (0, 8)) -> pn.Row:
            return pn.Row(*cards, sizing_mode="stretch_width", margin=margin)

        return pn.Column(
            self.header,
            row(self.cluster.graph_card, self.chat.card, margin=(6, 8, 0, 8)),
            row(self.cluster.nodes_card),
            row(self.instances.card),
            row(self.plans.card),
            row(self.bench.card, margin=(0, 8, 16, 8)),
            sizing_mode="stretch_width",
            margin=0,
            styles={"background": "#f3f5f8"},
        )

    def tick(self) -> None:
        """Copy what changed in the source into this page (runs every second on the session's loop)."""
        src = self.source
        topo = src.topology
        instances = src.instances()
        rows = src.rows()
        self.cluster.update(topo, src.version, instances)
        if self.instances.update(rows, dict(src.launches), src.cluster is not None, dict(src.stops)):
            self.chat.update_models()
        self.plans.update()
        self.bench.update()
        text = header_html(src, topo, rows)
        if text != self.header.object:
            self.header.object = text


def create_app(source: DashboardSource | None = None) -> pn.viewable.Viewable:
    """The page for one browser session (``panel serve`` calls this once per session, see ``panel_app.py``).

    Without a ``source``, one shared per process is made from the environment (:func:`source_from_env`).
    """
    pn.extension("tabulator", raw_css=[PAGE_CSS])
    if source is None:
        source = pn.state.as_cached("exo-lab-dashboard-source", source_from_env)
    source.start()
    dash = Dashboard(source)
    if pn.state.curdoc is not None and pn.state.curdoc.session_context is not None:
        pn.state.add_periodic_callback(dash.tick, period=TICK_MS)
    return dash.layout


def source_from_env() -> DashboardSource:
    """A source configured by ``EXO_LAB_DASHBOARD_CONNECT`` (``host:port,...``) and ``EXO_LAB_DASHBOARD_BENCH``."""
    addresses = defaults.dashboard_connect()
    cluster = connect(addresses) if addresses else None
    return DashboardSource(cluster=cluster, bench=defaults.dashboard_bench())
