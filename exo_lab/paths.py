"""Where exo_lab keeps its files (models cache, tokenizers, node state), and private files and directories."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

from exo_lab import defaults


def cache_dir() -> Path:
    """Root of exo_lab's cache: ``$EXO_LAB_CACHE_DIR`` or ``$XDG_CACHE_HOME/exo_lab``."""
    root = defaults.cache_dir()
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "exo_lab"


def models_dir() -> Path:
    """Directory of cached models: ``$EXO_LAB_MODELS_DIR`` or ``<cache>/models``."""
    override = defaults.models_dir()
    return Path(override).expanduser() if override else cache_dir() / "models"


def runtime_dir() -> Path:
    """Files of running processes (coordinator registrations): ``$EXO_LAB_RUNTIME_DIR`` or ``<cache>/run``.

    Deliberately not ``$XDG_RUNTIME_DIR``: a kernel, a terminal and a Jupyter server started by a
    service manager must all agree on it, and only the home directory is sure to be shared.
    """
    override = defaults.runtime_dir()
    return Path(override).expanduser() if override else cache_dir() / "run"


def node_state_dir() -> Path:
    """A node agent's state (id, cluster key, profile): ``$EXO_LAB_STATE_DIR`` or ``$XDG_STATE_HOME/exo_lab/node``."""
    override = defaults.state_dir()
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "exo_lab" / "node"


def private_dir(path: Path) -> Path:
    """``path`` as a directory only this user can enter (mode 0700), made with its parents if missing.

    Where a directory holds secrets (the cluster key, rank configs): an existing one that others
    can read is narrowed to 0700.
    """
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by this user only (mode 0600)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a leftover file of that name keeps its mode otherwise
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
