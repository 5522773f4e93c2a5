"""The ``exo-lab`` command line, run as a user would."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

import pytest

from tests.helpers.net import free_port, wait_http

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


def _agent_instances(agent_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{agent_port}/instances") as r:
        return json.load(r)


def _up(port: int, agent_port: int, state_dir, *extra: str) -> subprocess.Popen:
    argv = [*EXO, "up", "--port", str(port), "--agent-port", str(agent_port), "--probe-port", "0"]
    argv += ["--state-dir", str(state_dir)]
    argv += ["--no-mdns", "--no-dashboard", *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_up_is_a_cluster_member_serving_the_demo_and_leaves_nothing_behind(tmp_path):
    """Alone, ``exo-lab up`` runs an agent, launches the demo on it and serves it; SIGTERM stops everything,
    and ``exo-lab up`` restarted on the same machine finds no leftovers."""
    import openai
    import psutil

    from tests.helpers.polling import wait_for

    port, agent_port = free_port(), free_port()
    proc = _up(port, agent_port, tmp_path / "node")
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc, deadline_s=120)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        wait_for(lambda: [m.id for m in client.models.list().data] == ["demo"], 60, "demo listed")
        reply = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
        )
        assert reply.usage.completion_tokens == 4
        agent = _agent_instances(agent_port)
        pids = [r["pid"] for i in agent["instances"] for r in i["ranks"]]
        assert pids and agent["reserved_bytes"] > 0
        iid = agent["instances"][0]["id"]
        key = (tmp_path / "node" / "cluster.key").read_text().strip()
        where = ["--connect", f"127.0.0.1:{agent_port}", "--cluster-key", key]
        listed = run("instances", *where)
        assert listed.returncode == 0 and iid in listed.stdout and "demo" in listed.stdout, listed
        gone = run("instances", "delete", iid, *where)
        assert gone.returncode == 0 and "through its owner" in gone.stdout, gone
        wait_for(lambda: _agent_instances(agent_port)["reserved_bytes"] == 0, 15, "the reservation freed")
        wait_for(lambda: not any(psutil.pid_exists(p) for p in pids), 15, "the demo's workers exit")
        assert [m.id for m in client.models.list().data] == []
        assert run("instances", "delete", iid, *where).returncode == 1
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert f"exo_lab API: http://127.0.0.1:{port}" in out and "BLAS: openblas" in out

    again = _up(port, agent_port, tmp_path / "node", "--no-model")
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=again, deadline_s=120)
        assert _agent_instances(agent_port) == {**_agent_instances(agent_port), "instances": [], "reserved_bytes": 0}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/instances") as r:
            assert json.load(r) == {"instances": []}
    finally:
        again.send_signal(signal.SIGTERM)
        again.communicate(timeout=30)


def test_port_in_use_is_a_clear_error(tiny_model):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        out = run("serve", "--model", str(tiny_model), "--port", str(s.getsockname()[1]))
    assert out.returncode == 2 and "cannot listen" in out.stderr


@pytest.mark.slow
def test_max_batch_and_queue_bound_the_served_engine(tiny_model):
    import socket
    import urllib.error

    port = free_port()
    proc = subprocess.Popen(
        [*EXO, "serve", "--model", str(tiny_model), "--port", str(port), "--max-batch", "1", "--max-queue", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
        body = json.dumps(
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 100000,
                "stream": True,
                "ignore_eos": True,
            }
        ).encode()
        sock = socket.create_connection(("127.0.0.1", port))  # holds the one place
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        data = b""
        while data.count(b"data:") < 2:
            data += sock.recv(65536)
        second = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=body.replace(b'"stream": true', b'"stream": false'),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(second, timeout=30)
        assert err.value.code == 429 and json.load(err.value)["error"]["type"] == "rate_limit_error"
        sock.close()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    out = run("serve", "--model", str(tiny_model), "--port", str(free_port()), "--max-batch", "0")
    assert out.returncode == 2 and "max_batch must be >= 1" in out.stderr
