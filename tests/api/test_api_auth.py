"""API key: ``exo-lab serve --api-key`` / ``EXO_LAB_API_KEY`` / ``serve(api_key=)``; 401s in each family's shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anthropic
import ollama
import openai
import pytest

from tests.helpers.net import free_port, wait_http
from tests.helpers.raw_http import raw
from tests.helpers.stub_backend import StubBackend

KEY = "s3cret-key"
MSGS = [{"role": "user", "content": "Hello"}]


class KeyServer:
    """``exo-lab serve`` with an API key, given by flag or by environment."""

    def __init__(self, model: Path, flag: bool = True) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        args = [
            sys.executable,
            "-m",
            "exo_lab.cli",
            "serve",
            "--model",
            str(model),
            "--name",
            "tiny",
            "--port",
            str(self.port),
        ]
        if flag:
            args += ["--api-key", KEY]
            env.pop("EXO_LAB_API_KEY", None)
        else:
            env["EXO_LAB_API_KEY"] = KEY
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        wait_http(self.url + "/health", proc=self.proc)

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture(scope="module", params=["flag", "env"])
def keyed(request, tiny_model):
    srv = KeyServer(tiny_model, flag=request.param == "flag")
    yield srv
    assert srv.proc.poll() is None, "the server died during the tests"
    assert srv.stop() == 0


BODIES = {
    "/v1/chat/completions": {"model": "tiny", "messages": MSGS, "max_tokens": 2},
    "/v1/responses": {"model": "tiny", "input": "hi", "max_output_tokens": 2},
    "/v1/messages": {"model": "tiny", "messages": MSGS, "max_tokens": 2},
    "/v1/messages/count_tokens": {"model": "tiny", "messages": MSGS},
    "/api/chat": {"model": "tiny", "messages": MSGS, "stream": False, "options": {"num_predict": 2}},
    "/api/generate": {"model": "tiny", "prompt": "hi", "stream": False, "options": {"num_predict": 2}},
    "/api/show": {"model": "tiny"},
    "/ollama/api/chat": {"model": "tiny", "messages": MSGS, "stream": False, "options": {"num_predict": 2}},
}
GETS = [
    "/v1/models",
    "/v1/models/tiny",
    "/openapi.json",
    "/api/tags",
    "/api/ps",
    "/api/version",
    "/ollama/api/tags",
    "/instance/previews?model_id=tiny",
]


def family(path: str) -> str:
    if path.startswith(("/api", "/ollama")):
        return "ollama"
    return "anthropic" if path.startswith("/v1/messages") else "openai"


def assert_401(status: int, body: bytes, fam: str) -> None:
    assert status == 401, body
    data = json.loads(body)
    if fam == "openai":
        assert data["error"]["code"] == "invalid_api_key" and data["error"]["message"]
    elif fam == "anthropic":
        assert data["type"] == "error" and data["error"]["type"] == "authentication_error"
    else:
        assert list(data) == ["error"] and "key" in data["error"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"x-api-key": "wrong"},
        {"Authorization": KEY},
        {"Authorization": f"Basic {KEY}"},
    ],
)
def test_missing_or_wrong_key_is_401_everywhere(keyed, headers):
    for path, body in BODIES.items():
        assert_401(*raw(keyed, "POST", path, json.dumps(body), headers), family(path))
    for path in GETS:
        assert_401(*raw(keyed, "GET", path, None, headers), family(path))
    # the Anthropic client's header picks Anthropic's shape on shared routes
    status, data = raw(keyed, "GET", "/v1/models", None, {**headers, "anthropic-version": "2023-06-01"})
    assert_401(status, data, "anthropic")
    # an unknown path answers 401 too (nothing is revealed without the key)
    assert raw(keyed, "POST", "/v1/nothing", b"{}", headers)[0] == 401


@pytest.mark.slow
def test_right_key_in_either_header_works_everywhere(keyed):
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}, {"authorization": f"bearer {KEY}"}):
        for path, body in BODIES.items():
            status, data = raw(keyed, "POST", path, json.dumps(body), headers)
            assert status == 200, (path, data)
        for path in GETS:
            assert raw(keyed, "GET", path, None, headers)[0] == 200, path


@pytest.mark.slow
def test_open_routes(keyed):
    status, body = raw(keyed, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert raw(keyed, "GET", "/") == (200, b"Ollama is running")


@pytest.mark.slow
def test_official_clients(keyed):
    oc = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0)
    assert oc.chat.completions.create(model="tiny", messages=MSGS, max_tokens=3).usage.completion_tokens == 3
    assert oc.responses.create(model="tiny", input="hi", max_output_tokens=3).usage.output_tokens == 3
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="nope", max_retries=0).models.list()

    ac = anthropic.Anthropic(base_url=keyed.url, api_key=KEY, max_retries=0)
    assert ac.messages.create(model="tiny", messages=MSGS, max_tokens=3).usage.output_tokens == 3
    assert [m.id for m in ac.models.list().data] == ["tiny"]
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=keyed.url, api_key="nope", max_retries=0).messages.create(
            model="tiny", messages=MSGS, max_tokens=3
        )

    lc = ollama.Client(host=keyed.url, headers={"Authorization": f"Bearer {KEY}"})
    assert lc.chat(model="tiny", messages=MSGS, options={"num_predict": 3}).eval_count == 3
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=keyed.url).chat(model="tiny", messages=MSGS)
    assert err.value.status_code == 401


# --- in process: serve(api_key=...), and a key generated for a non-loopback address ----------


def test_serve_with_api_key_in_process():
    import exo_lab

    srv = exo_lab.serve(StubBackend(), port=0, api_key=KEY)
    try:
        assert srv.api_key == KEY
        assert_401(*raw(srv, "GET", "/v1/models"), "openai")
        assert raw(srv, "GET", "/v1/models", None, {"Authorization": f"Bearer {KEY}"})[0] == 200
    finally:
        srv.stop()


def test_env_key_and_open_by_default_on_loopback(monkeypatch):
    import exo_lab

    monkeypatch.delenv("EXO_LAB_API_KEY", raising=False)
    srv = exo_lab.serve(StubBackend(), port=0)
    try:
        assert srv.api_key is None and raw(srv, "GET", "/v1/models")[0] == 200
    finally:
        srv.stop()
    monkeypatch.setenv("EXO_LAB_API_KEY", "from-env")
    srv = exo_lab.serve(StubBackend(), port=0)
    try:
        assert srv.api_key == "from-env"
        assert raw(srv, "GET", "/v1/models")[0] == 401
        assert raw(srv, "GET", "/v1/models", None, {"x-api-key": "from-env"})[0] == 200
    finally:
        srv.stop()


def test_non_loopback_bind_generates_a_key(monkeypatch, capsys):
    import exo_lab
    from exo_lab.api.server import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.1.2.3")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("myhost.lan")
    monkeypatch.delenv("EXO_LAB_API_KEY", raising=False)
    srv = exo_lab.serve(StubBackend(), port=0, host="0.0.0.0")
    try:
        key = srv.api_key
        assert key and len(key) >= 24 and key in capsys.readouterr().out
        assert raw(srv, "GET", "/v1/models")[0] == 401
        assert raw(srv, "GET", "/v1/models", None, {"Authorization": f"Bearer {key}"})[0] == 200
    finally:
        srv.stop()


def test_a_server_made_directly_off_loopback_needs_a_key_too(monkeypatch, capsys):
    """``Server(...)`` itself, not only ``serve()``: off loopback it takes the environment's key or makes one."""
    from exo_lab.api.registry import ModelRegistry
    from exo_lab.api.server import Server

    monkeypatch.delenv("EXO_LAB_API_KEY", raising=False)
    registry = ModelRegistry()
    registry.add(StubBackend(), "stub")
    srv = Server(registry, host="0.0.0.0", port=0).start()
    try:
        key = srv.api_key
        assert key and len(key) >= 24 and key in capsys.readouterr().out
        assert_401(*raw(srv, "GET", "/v1/models"), "openai")
        assert raw(srv, "GET", "/v1/models", None, {"Authorization": f"Bearer {key}"})[0] == 200
    finally:
        srv.stop()
    monkeypatch.setenv("EXO_LAB_API_KEY", "the-key-of-the-environment")
    srv = Server(registry, host="0.0.0.0", port=0).start()
    try:
        assert srv.api_key == "the-key-of-the-environment"
        assert raw(srv, "GET", "/v1/models")[0] == 401
    finally:
        srv.stop()
    assert Server(registry, host="127.0.0.1", port=0).api_key is None  # loopback stays open unless told
