"""Shared fixtures: a private model cache, the tiny synthetic model, a running server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import exo_lab  # noqa: F401  (first: preloads OpenBLAS before mlx)

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
# Debian chromium, driven by Playwright (never `playwright install`): no GPU, no background traffic
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync"]



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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, deadline_s: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    import urllib.request

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {deadline_s} s")


class ServerProcess:
    """``exo-lab serve`` in a subprocess."""

    def __init__(self, model: Path, name: str = "tiny") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exo_lab.cli", "serve", "--model", str(model), "--name", name, "--port", str(self.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_http(self.url + "/health", proc=self.proc)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(tiny_model)
    yield srv
    assert srv.alive(), "the server died during the tests"
    assert srv.stop() == 0
