"""Hatch build hook: a wheel ships the built JupyterLab extension, when it has been built.

``make labextension`` builds ``extensions/jupyterlab`` into ``exo_lab/labextension`` (not in
git). A wheel installs it as ``share/jupyter/labextensions/exo-lab``, so JupyterLab loads it
without Node.js on the user's machine. Editable installs link it instead (see the Makefile),
so that a rebuild shows up without reinstalling.
"""

from __future__ import annotations

from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class LabExtensionHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel" or version == "editable":
            return
        built = Path(self.root) / "exo_lab" / "labextension"
        if (built / "package.json").is_file():
            build_data["shared_data"][str(built)] = "share/jupyter/labextensions/exo-lab"
        else:
            self.app.display_warning("exo_lab: the JupyterLab extension is not built (run `make labextension`); "
                                     "this wheel has the server extension only")
