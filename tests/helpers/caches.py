"""A private exo_lab cache for tests that write to it (calibrations stored in the nodes' profiles)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from exo_lab import paths


@contextmanager
def private_cache(directory: Path) -> Iterator[Path]:
    """``$EXO_LAB_CACHE_DIR`` set to ``directory`` (for this process and the nodes it starts) while inside,
    seeded with this machine's measured profiles (saves their microbenchmarks): what the tests store in a
    profile, a calibration fitted to a tiny model say, stays out of the user's cache."""
    profiles = paths.cache_dir() / "profiles"
    if profiles.is_dir():
        shutil.copytree(profiles, directory / "profiles", ignore=shutil.ignore_patterns("*.tmp"), dirs_exist_ok=True)
    old = os.environ.get("EXO_LAB_CACHE_DIR")
    os.environ["EXO_LAB_CACHE_DIR"] = str(directory)
    try:
        yield directory
    finally:
        if old is None:
            os.environ.pop("EXO_LAB_CACHE_DIR", None)
        else:
            os.environ["EXO_LAB_CACHE_DIR"] = old
