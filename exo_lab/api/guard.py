"""What keeps web pages off a keyless loopback server: the Host, the Origin and the body's type.

A server bound to loopback without an API key trusts whoever can connect, which should be this machine's
users and programs. A browser is the exception: any page the user opens can send requests there (a
"drive-by" form or ``fetch``), and a page whose name rebinds to 127.0.0.1 can even read the answers
(DNS rebinding). Three checks stop both, without touching what real clients send:

- ``Host`` must name loopback (``localhost``, ``127.x.y.z``, ``[::1]``): a rebound page sends its own name.
  Its port is not checked: a browser addressing this server sends this server's port, and a different
  one means a forwarder the user set up (``ssh -L 9000:localhost:52415``).
- ``Origin``, when sent, must be a loopback origin: browsers send it with every cross-origin request
  (and with every POST), other clients don't.
- a POST body must be declared JSON (``Content-Type: application/json`` or ``application/<x>+json``): a
  page can send ``text/plain``, form or multipart bodies without asking, but no other type without a
  CORS preflight, which this server never grants. The official OpenAI, Anthropic and Ollama clients send
  ``application/json``; ``curl`` needs ``-H 'Content-Type: application/json'``.

A server with an API key needs none of this (a page cannot send the key), nor does a request signed
with the cluster key (another member of the cluster).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from exo_lab.api.errors import ApiError

LOOPBACK_NAMES = ("localhost", "localhost.localdomain")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) only reaches this machine."""
    host = host.strip().lower().rstrip(".")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """The name in a ``Host`` header (``name``, ``name:port``, ``[v6]`` or ``[v6]:port``)."""
    if host_header.startswith("["):
        return host_header[: host_header.find("]") + 1] if "]" in host_header else host_header
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def loopback_origin(origin: str) -> bool:
    """Whether ``origin`` (``scheme://host[:port]``) is a page served from this machine's loopback."""
    try:
        parts = urlsplit(origin)
        hostname = parts.hostname
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and hostname is not None and is_loopback(hostname)


def is_json(content_type: str | None) -> bool:
    """Whether a ``Content-Type`` declares JSON: ``application/json`` or ``application/<x>+json``."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    kind, _, subtype = media.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


def browser_problem(host: str | None, origin: str | None) -> ApiError | None:
    """Why a request to a keyless loopback server may come from a web page (421, 403), else None."""
    if host and not is_loopback(host_name(host)):
        return ApiError(
            421,
            f"This server answers only requests addressed to loopback (localhost, 127.0.0.1), not to {host!r}: "
            "it has no API key, so it serves this machine only. Serve with an API key to be reached by other names.",
            code="misdirected_request",
        )
    if origin is not None and not loopback_origin(origin):
        return ApiError(
            403,
            f"Requests from web pages of other sites (Origin {origin!r}) are refused: this server has no API key.",
            type="permission_error",
            code="forbidden_origin",
        )
    return None


def not_json(content_type: str | None) -> ApiError:
    """The 415 for a POST whose body is not declared JSON."""
    return ApiError(
        415,
        f"The request body must be JSON sent as 'Content-Type: application/json', not {content_type or 'no type'!r} "
        "(with curl: -H 'Content-Type: application/json').",
        code="unsupported_media_type",
    )
