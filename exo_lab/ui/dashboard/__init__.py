"""The exo_lab dashboard: a Panel app for a cluster, its instances and the models served in this process.

``exo-lab dashboard`` and ``exo-lab up`` serve it (loopback only unless told otherwise, and then behind a token);
``panel serve exo_lab/ui/dashboard/panel_app.py`` works too. One module per concern:

- :mod:`.source`: what every session shows (a cluster, a what-if topology or this machine), refreshed on a thread
- :mod:`.app`: one session's page, assembled from the sections below; ``create_app`` for ``panel serve``
- :mod:`.cluster_view`: the cluster graph (exo_lab's one renderer via Panel's AnyWidgetComponent) and node table
- :mod:`.chat`: the chat box that streams from a served model or a ready instance
- :mod:`.instances_view`: every instance of the cluster with its state, load progress, owner, nodes, tokens/s
  and a Stop button; :mod:`.instance_rows` merges the cluster's instances with the models served here
- :mod:`.plans_view`: placement previews and launching a plan (through the cluster's Control, like the API)
- :mod:`.bench_view`: bench results, predicted vs measured
- :mod:`.header`, :mod:`.theme`, :mod:`.frames`: the header bar, the look, typed tables
- :mod:`.server`: serving it on a thread of its own (``serve_dashboard``); :mod:`.auth`: off loopback, the token
  its page and websocket need
"""

from exo_lab.ui.dashboard.app import Dashboard, create_app
from exo_lab.ui.dashboard.server import DEFAULT_PORT, DashboardServer, serve_dashboard
from exo_lab.ui.dashboard.source import DashboardSource

__all__ = ["DEFAULT_PORT", "Dashboard", "DashboardServer", "DashboardSource", "create_app", "serve_dashboard"]
