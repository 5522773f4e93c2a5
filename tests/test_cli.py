"""The ``exo-lab`` command line, run as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from tests.conftest import free_port, wait_http

EXO = [sys.executable, "-m", "exo_lab.cli"]


def run(*args, **kw):
    return subprocess.run([*EXO, *args], capture_output=True, text=True, timeout=120, **kw)


def test_models_synth_and_card(tmp_path):
    out = run("models", "synth", str(tmp_path / "q"), "--preset", "qwen3-tiny", "--seed", "2")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "q" / "config.json").exists()
    card = json.loads(run("models", "card", str(tmp_path / "q")).stdout)
    assert card["architecture"] == "qwen3" and card["num_layers"] == 4 and card["weight_bytes"] > 0
    again = run("models", "synth", str(tmp_path / "q"), "--preset", "qwen3-tiny")
    assert again.returncode == 2 and "exists" in again.stderr


def test_models_list_names_the_presets():
    out = run("models", "list")
    assert out.returncode == 0 and "llama-1b" in out.stdout and "qwen2-tiny" in out.stdout


def test_bad_model_is_a_clear_error():
    out = run("serve", "--model", "no-such-model", "--port", str(free_port()))
    assert out.returncode == 2 and "no model 'no-such-model'" in out.stderr


@pytest.mark.slow
def test_up_serves_the_demo_and_stops_cleanly_on_sigterm():
    port = free_port()
    proc = subprocess.Popen([*EXO, "up", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ})
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models") as r:
            assert [m["id"] for m in json.load(r)["data"]] == ["demo"]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert f"exo_lab API: http://127.0.0.1:{port}" in out and "BLAS: openblas" in out


def test_port_in_use_is_a_clear_error(tiny_model):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        out = run("serve", "--model", str(tiny_model), "--port", str(s.getsockname()[1]))
    assert out.returncode == 2 and "cannot listen" in out.stderr
