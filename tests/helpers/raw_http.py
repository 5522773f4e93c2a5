"""Raw HTTP against a test server, and the shape of an OpenAI error."""

from __future__ import annotations

import http.client
import json


def raw(server, method, path, body=None, headers=None):
    """``method path`` with ``body`` (declared JSON unless ``headers`` give a Content-Type); (status, body)."""
    headers = dict(headers or {})
    if body is not None and not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = "application/json"
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def assert_openai_error(status, body, code_status, param=None):
    assert status == code_status, body
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
