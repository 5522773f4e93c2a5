"""A member's API passes on the owner's answer only when the owner signed it: whole answers are held and checked,
streamed ones checked at their headers. Real tornado servers: an owner, and a member forwarding to it."""

from __future__ import annotations

import asyncio
import json

import pytest
import tornado.web
from tornado.httpclient import AsyncHTTPClient

from exo_lab.api.errors import ApiError
from exo_lab.api.forward import forward
from exo_lab.cluster.auth import HEADER_RESPONSE_SIG, Verifier
from exo_lab.cluster.signed_handler import SignedHandler

KEY = "k" * 64


class Owner(SignedHandler):
    """``/whole``: a JSON answer; ``/stream``: two NDJSON lines flushed apart; ``/forged``: a made-up signature;
    ``/unsigned``: no signature (what a relay or a non-member sends)."""

    def post(self, what: str) -> None:
        if self.signature_problem(Verifier(KEY)):
            raise tornado.web.HTTPError(401)
        if what == "unsigned":
            self._answer_nonce = None
        if what == "forged":
            self.set_header(HEADER_RESPONSE_SIG, "0" * 64)
        if what == "stream":
            self.write(b'{"i": 0}\n')
            self.flush()
            self.write(b'{"i": 1}\n')
        else:
            self.write(b'{"ok": true}')
        self.finish()


class Member(tornado.web.RequestHandler):
    """Forwards every request to the owner at ``owner``, as a member's API does."""

    client_gone = False

    def initialize(self, owner: str) -> None:
        self.owner = owner

    async def post(self, _: str) -> None:
        try:
            await forward(self, self.owner, KEY)
        except ApiError as exc:
            self.set_status(exc.status)
            self.finish(json.dumps({"error": str(exc)}))


async def _through_member(path: str) -> tuple[int, bytes]:
    owner = tornado.web.Application([(r"/(.*)", Owner)]).listen(0, "127.0.0.1")
    owner_port = next(iter(owner._sockets.values())).getsockname()[1]
    member_app = tornado.web.Application([(r"/(.*)", Member, {"owner": f"http://127.0.0.1:{owner_port}"})])
    member = member_app.listen(0, "127.0.0.1")
    port = next(iter(member._sockets.values())).getsockname()[1]
    client = AsyncHTTPClient(force_instance=True)
    try:
        resp = await client.fetch(f"http://127.0.0.1:{port}{path}", method="POST", body=b"{}", raise_error=False)
        return resp.code, resp.body
    finally:
        client.close()
        owner.stop()
        member.stop()


@pytest.mark.parametrize(
    ("path", "status", "body"),
    [("/whole", 200, b'{"ok": true}'), ("/stream", 200, b'{"i": 0}\n{"i": 1}\n')],
)
def test_a_signed_answer_is_passed_on(path, status, body):
    assert asyncio.run(_through_member(path)) == (status, body)


@pytest.mark.parametrize("path", ["/forged", "/unsigned"])
def test_an_answer_the_owner_did_not_sign_is_not_passed_on(path):
    status, body = asyncio.run(_through_member(path))
    assert status == 502 and b"not authentic" in body and b"ok" not in body
