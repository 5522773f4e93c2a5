"""``panel serve exo_lab/ui/dashboard/panel_app.py`` serves the dashboard (configured by ``EXO_LAB_DASHBOARD_CONNECT``
and ``EXO_LAB_DASHBOARD_BENCH``); ``exo-lab dashboard`` and ``exo-lab up`` are the usual ways."""

from exo_lab.ui.dashboard.app import create_app

if __name__.startswith("bokeh_app"):  # run by `panel serve`
    create_app().servable(title="exo_lab dashboard")
