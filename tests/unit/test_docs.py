"""The repository's own documents stay true to the code: ARCHITECTURE.md's ports and variables, README's links."""

from __future__ import annotations

import re

from exo_lab import defaults
from tests.helpers.paths import REPO

ARCHITECTURE = (REPO / "ARCHITECTURE.md").read_text()


def test_architecture_lists_every_environment_variable_and_port():
    listed = set(re.findall(r"`(EXO_LAB_[A-Z_]+)`", ARCHITECTURE))
    assert listed == set(defaults.VARIABLES)
    for port in (defaults.API_PORT, defaults.AGENT_PORT, defaults.PROBE_PORT, defaults.DASHBOARD_PORT):
        assert f"| {port} |" in ARCHITECTURE


def test_architecture_names_modules_that_exist():
    for path in re.findall(
        r"`((?:api|engine|cluster|ui|placement|models|bench|sim)/[a-z_/]+\.(?:py|js))`", ARCHITECTURE
    ):
        assert (REPO / "exo_lab" / path).exists(), path


def test_readme_links_only_inside_the_repository():
    readme = (REPO / "README.md").read_text()
    assert "](ARCHITECTURE.md)" in readme
    assert "../" not in readme
