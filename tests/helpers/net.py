"""Free ports and waiting for a server to answer."""

from __future__ import annotations

import subprocess
import time
import urllib.request

from exo_lab.cluster.ports import free_port

__all__ = ["free_port", "wait_http"]


def wait_http(url: str, deadline_s: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"server exited early with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {deadline_s} s")
