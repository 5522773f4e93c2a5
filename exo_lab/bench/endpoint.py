"""Any OpenAI-compatible server as a bench target: streamed chat completions timed on this side.

``exo-lab bench --url`` measures exo_lab, mlx_lm.server, exo or llama.cpp's server on the same
prompts. Each request is a streamed ``/v1/chat/completions`` at temperature 0 with ``max_tokens``
and ``ignore_eos`` (dropped, and said so, if the server refuses it), asking for usage
(``stream_options.include_usage``). Timings are this client's: TTFT from sending the request to the
first chunk that carries text, decode tok/s ``(completion tokens - 1) / (last chunk - first chunk)``,
prompt tok/s ``prompt tokens / TTFT``. Token counts come from the server's usage when it sends
one, else from the chunks with text (one token each, as most servers stream). Timings a server
reports itself (llama.cpp's ``timings``) are kept beside ours.

A cluster instance is reached the same way, through its owner's API, with requests signed by the
cluster key (:mod:`exo_lab.cluster.auth`); the answer's signature covers its status.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from exo_lab.bench.results import BenchError
from exo_lab.cluster.auth import HEADER_NONCE, HEADER_RESPONSE_SIG, response_is_authentic, sign_headers


@dataclass
class Sample:
    """One request's measurement (times in seconds from sending it)."""

    prompt_tokens: int
    completion_tokens: int
    ttft_s: float  # to the first token: the engine's own when timing is "engine", else this client's
    decode_tps: float | None  # (completion tokens - 1) / time from the first token to the last
    client_ttft_s: float  # this client: from submitting to the first token (queueing included)
    end_s: float  # this client: from submitting to the last chunk
    server: dict[str, Any] = field(default_factory=dict)
    usage: Any = field(default=None, repr=False)  # the engine's own Usage, for a held instance

    @property
    def prompt_tps(self) -> float | None:
        return self.prompt_tokens / self.ttft_s if self.ttft_s > 0 else None


def base_url(url: str) -> tuple[str, str, int, str]:
    """``(scheme, host, port, path prefix ending in /v1)`` of an OpenAI base URL or server root (BenchError if malformed)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise BenchError(f"--url {url!r} is not a valid URL ({exc}); give e.g. http://127.0.0.1:8080/v1") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BenchError(f"--url {url!r} is not an http(s) URL with a host; give e.g. http://127.0.0.1:8080/v1")
    path = parts.path.rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), path


class Endpoint:
    """Streamed chat completions from one OpenAI-compatible server (``cluster_key``: sign, for an exo_lab owner)."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        api_key: str | None = None,
        *,
        cluster_key: str | None = None,
        timeout: float = 300.0,
        ignore_eos: bool = True,
    ) -> None:
        self.url = url
        self.scheme, self.host, self.port, self.prefix = base_url(url)
        self.api_key = api_key
        self.cluster_key = cluster_key
        self.timeout = timeout
        self.ignore_eos = ignore_eos
        self.model = model or self._first_model()

    @property
    def display_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.prefix}"

    # -- HTTP
    def _open(self, method: str, path: str, body: bytes | None) -> tuple[http.client.HTTPResponse, str | None]:
        full = self.prefix + path
        headers = {"Accept": "application/json, text/event-stream"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        nonce = None
        if self.cluster_key:
            signed = sign_headers(self.cluster_key, method, full, body or b"")
            headers.update(signed)
            nonce = signed[HEADER_NONCE]
        conn_cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, full, body=body, headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            why = "timed out" if isinstance(exc, (TimeoutError, socket.timeout)) else str(exc) or type(exc).__name__
            raise BenchError(f"cannot reach {self.display_url} ({method} {full}): {why}") from None
        return resp, nonce

    def _check(self, resp: http.client.HTTPResponse, nonce: str | None, what: str, body: bytes | None) -> None:
        if self.cluster_key and nonce:
            sig = resp.getheader(HEADER_RESPONSE_SIG)
            if not response_is_authentic(self.cluster_key, nonce, resp.status, body, sig):
                raise BenchError(f"{what}: the answer is not signed with the cluster key")
        if resp.status >= 400:
            detail = (body if body is not None else resp.read())[:300].decode(errors="replace").strip()
            hint = " (give --api-key)" if resp.status in (401, 403) else ""
            raise BenchError(f"{what}: HTTP {resp.status}{hint}: {detail}")

    def _first_model(self) -> str:
        resp, nonce = self._open("GET", "/models", None)
        data = resp.read()
        self._check(resp, nonce, f"GET {self.display_url}/models", data)
        try:
            models = [m["id"] for m in json.loads(data)["data"]]
        except (ValueError, KeyError, TypeError):
            raise BenchError(
                f"{self.display_url}/models did not answer an OpenAI model list; is it an OpenAI-compatible API? "
                "(if it is, name the model: --model)"
            ) from None
        if not models:
            raise BenchError(f"{self.display_url}/models lists no model; name the one to use (--model)")
        return models[0]

    # -- one request
    def _body(self, text: str, max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body

    def complete(self, text: str, max_tokens: int, t0: float | None = None) -> Sample:
        """Stream one chat completion of ``text``; its timings (from ``t0``, default now)."""
        try:
            return self._complete(text, max_tokens, time.perf_counter() if t0 is None else t0)
        except BenchError as exc:
            if self.ignore_eos and "ignore_eos" in str(exc) and "HTTP 4" in str(exc):
                self.ignore_eos = False  # a server that refuses the parameter: generate to EOS or max_tokens
                return self._complete(text, max_tokens, time.perf_counter() if t0 is None else t0)
            raise

    def _complete(self, text: str, max_tokens: int, t0: float) -> Sample:
        what = f"POST {self.display_url}/chat/completions"
        resp, nonce = self._open("POST", "/chat/completions", json.dumps(self._body(text, max_tokens)).encode())
        streamed = "text/event-stream" in (resp.getheader("Content-Type") or "")
        if not streamed or resp.status >= 400:
            self._check(resp, nonce, what, resp.read())
            raise BenchError(
                f"{what}: the answer is not an event stream (Content-Type {resp.getheader('Content-Type')})"
            )
        self._check(resp, nonce, what, None)
        first = last = None
        chunks = 0
        usage: dict[str, Any] = {}
        server: dict[str, Any] = {}
        try:
            for raw in resp:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                try:
                    chunk = json.loads(payload)
                except ValueError:
                    raise BenchError(f"{what}: a streamed event is not JSON: {payload[:120]!r}") from None
                if chunk.get("error"):
                    raise BenchError(f"{what}: the server ended the stream with an error: {chunk['error']}")
                now = time.perf_counter() - t0
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if any(delta.get(k) for k in ("content", "reasoning_content", "reasoning")):
                        first = now if first is None else first
                        last = now
                        chunks += 1
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if chunk.get("timings"):  # llama.cpp's own
                    server = dict(chunk["timings"])
        except (OSError, http.client.HTTPException) as exc:
            raise BenchError(f"{what}: the stream broke off: {exc}") from None
        finally:
            resp.close()
        end = time.perf_counter() - t0
        if first is None or last is None:
            raise BenchError(f"{what}: the stream carried no text")
        completion = int(usage.get("completion_tokens") or chunks)
        decode = (completion - 1) / (last - first) if completion > 1 and last > first else None
        return Sample(
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=completion,
            ttft_s=first,
            decode_tps=decode,
            client_ttft_s=first,
            end_s=end,
            server=server,
        )
