"""pytest-jupyter's fixtures (``jp_fetch``, a Jupyter server per test) for this directory only.

Loaded here rather than with ``pytest_plugins``, which would apply its autouse fixtures (a
ServerApp and an event loop per test) to the whole suite.
"""

from pytest_jupyter.jupyter_server import *  # noqa: F403
