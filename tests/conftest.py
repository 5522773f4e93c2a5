"""Shared fixtures: a private model cache, the tiny synthetic model, a running server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import exo_lab
from tests.helpers.servers import ServerProcess


@pytest.fixture(scope="session", autouse=True)
def models_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test uses a fresh model cache, as on a new machine."""
    path = tmp_path_factory.mktemp("models")
    old = os.environ.get("EXO_LAB_MODELS_DIR")
    os.environ["EXO_LAB_MODELS_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("EXO_LAB_MODELS_DIR", None)
    else:
        os.environ["EXO_LAB_MODELS_DIR"] = old


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exo_lab.models import synthetic

    return synthetic.create(tmp_path_factory.mktemp("tiny") / "tiny", preset="tiny")


@pytest.fixture(scope="session")
def engine(tiny_model: Path) -> Iterator[exo_lab.Engine]:
    eng = exo_lab.Engine(tiny_model, name="tiny")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(tiny_model)
    yield srv
    assert srv.alive(), "the server died during the tests"
    assert srv.stop() == 0
