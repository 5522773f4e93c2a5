"""Who may use the dashboard: on loopback, this machine; off loopback, whoever shows its token.

The page launches and stops instances (signed with the cluster key) and chats with the models, all over
its websocket, so off loopback the page and the websocket need the token: the API key when the API has
one, else one generated when the dashboard starts (printed with its URL). :class:`TokenAuth` is the Bokeh
server's auth provider, so it guards every page, session and websocket request of the app:

- ``/login?token=TOKEN`` (the printed URL), or ``/?token=TOKEN``, sets an HttpOnly, SameSite=Lax cookie
  (a digest of the token, never the token itself; named after the port, as cookies are not per port);
  ``Authorization: Bearer TOKEN`` works for scripts;
- without it, the page is redirected to ``/login`` (401, a form for the token), and the websocket and
  every other request of the app (sessions, autoload, metadata) get 403.

Bokeh's own static files (JavaScript, CSS) stay public: they hold nothing of the cluster.
"""

from __future__ import annotations

import hashlib
import hmac
import html
from typing import Any

from bokeh.server.auth_provider import AuthProvider
from bokeh.server.views.doc_handler import DocHandler
from tornado.web import HTTPError, RequestHandler
from tornado.websocket import WebSocketHandler

USER = "token-holder"
LOGIN_URL = "/login"

LOGIN_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>exo_lab dashboard</title>
<style>body{{font-family:system-ui,sans-serif;background:#f3f5f8;display:flex;justify-content:center;
padding-top:12vh}} form{{background:#fff;border:1px solid #d8dde6;border-radius:10px;padding:24px 28px;
width:420px}} input{{width:100%;box-sizing:border-box;padding:8px;margin:10px 0}} .err{{color:#c0392b}}</style>
</head><body><form method="get" action="login">
<h3>exo_lab dashboard</h3>
<p>This dashboard is reachable from other machines, so it needs its token: the API key of
<code>exo-lab up</code>, or the token printed with the dashboard's URL when it started.</p>
{error}<input type="password" name="token" placeholder="token" autofocus>
<input type="hidden" name="next" value="{next}"><button type="submit">Open the dashboard</button>
</form></body></html>
"""


def bearer(headers: Any) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header."""
    auth = headers.get("Authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else None


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path of this server, never another site."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


class TokenAuth(AuthProvider):
    """The Bokeh auth provider of a dashboard off loopback: the token, or a cookie set by showing it once."""

    def __init__(self, token: str, port: int) -> None:
        self.token = token
        self.cookie = f"exo_lab_dashboard_{port}"
        self._session = hmac.new(token.encode(), b"exo_lab dashboard session", hashlib.sha256).hexdigest()
        self._login = type("DashboardLogin", (LoginHandler,), {"auth": self})
        super().__init__()

    # what Bokeh asks of an auth provider
    @property
    def get_user(self):
        return self.user

    @property
    def login_url(self) -> str:
        return LOGIN_URL

    @property
    def login_handler(self) -> type[RequestHandler]:
        return self._login

    # the checks
    def matches(self, token: str | None) -> bool:
        """Whether ``token`` is this dashboard's (constant-time)."""
        return token is not None and hmac.compare_digest(token.encode(), self.token.encode())

    def remember(self, handler: RequestHandler) -> None:
        """Set the session cookie on ``handler``'s response."""
        handler.set_cookie(self.cookie, self._session, httponly=True, samesite="Lax", path="/")

    def user(self, handler: RequestHandler) -> str | None:
        """The user of a request that shows the token or the cookie; without them, None for the page (Bokeh
        redirects it to the login form), 403 for anything else (the websocket above all)."""
        shown = handler.get_query_argument("token", None) or bearer(handler.request.headers)
        if self.matches(shown):
            if not isinstance(handler, WebSocketHandler):
                self.remember(handler)
            return USER
        cookie = handler.get_cookie(self.cookie) or ""
        if hmac.compare_digest(cookie.encode(), self._session.encode()):
            return USER
        if isinstance(handler, DocHandler) and handler.request.method in ("GET", "HEAD"):
            return None  # Bokeh sends the page to the login form
        raise HTTPError(403, "this dashboard needs its token (open its /login page)")


class LoginHandler(RequestHandler):
    """``/login``: with the right ``token``, set the cookie and go on to ``next``; else a form (401)."""

    auth: TokenAuth

    def get(self) -> None:
        token = self.get_query_argument("token", None)
        target = safe_next(self.get_query_argument("next", None))
        if token is not None and self.auth.matches(token):
            self.auth.remember(self)
            self.redirect(target)
            return
        self.set_status(401)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        error = "<p class='err'>That is not this dashboard's token.</p>" if token is not None else ""
        self.finish(LOGIN_PAGE.format(error=error, next=html.escape(target, quote=True)))
