"""``exo-lab serve`` in a subprocess, for API tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers.net import free_port, wait_http


class ServerProcess:
    """``exo-lab serve`` in a subprocess."""

    def __init__(self, model: Path, name: str = "tiny", extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "exo_lab.cli",
                "serve",
                "--model",
                str(model),
                "--name",
                name,
                "--port",
                str(self.port),
                *extra,
            ],
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
