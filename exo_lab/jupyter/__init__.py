"""The Jupyter server extension: ``/exo-lab/api/*`` routes for the JupyterLab side panel.

Enabled on install (``etc/jupyter/jupyter_server_config.d/exo_lab.json``); by hand:
``jupyter server extension enable exo_lab.jupyter``. The routes read the cluster of the
coordinator that registered itself on this machine (see :mod:`exo_lab.cluster.coordinators`)
and answer only requests that Jupyter has authenticated.
"""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "exo_lab.jupyter"}]


def _load_jupyter_server_extension(server_app: Any) -> None:
    from exo_lab.jupyter.handlers import setup_handlers  # the server imports routes only when it loads them

    setup_handlers(server_app.web_app)
    server_app.log.info(
        "exo_lab server extension: routes under %sexo-lab/api/", server_app.web_app.settings.get("base_url", "/")
    )
