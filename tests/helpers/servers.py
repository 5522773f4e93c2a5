"""``exo-lab serve`` in a subprocess, for API tests."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from tests.helpers.net import free_port, wait_http


class ServerProcess:
    """``exo-lab serve`` in a subprocess."""

    def __init__(self, model: Path, name: str = "tiny", extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name
        # a file, not a pipe nobody reads: a chatty server never blocks, and its errors can be shown
        self._log = tempfile.NamedTemporaryFile("w+", prefix="exo-lab-serve-", suffix=".log", delete=False)  # noqa: SIM115 (closed by stop)
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
            stdout=self._log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            wait_http(self.url + "/health", proc=self.proc)
        except (RuntimeError, TimeoutError) as err:
            raise RuntimeError(f"{err}\n{self.log()[-8000:]}") from err

    def log(self) -> str:
        """What the server has printed so far (its log)."""
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        self.proc.terminate()
        try:
            code = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        log = self.log()
        if "Traceback" in log:  # shown with a failed test's output: why a request got a 500
            print(f"--- the server's log ({self._log.name}) ---\n{log[-8000:]}")
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)
        return code
