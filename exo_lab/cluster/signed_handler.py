"""Tornado handlers that answer signed requests with signed answers: :class:`SignedHandler`.

A handler checks a request with :meth:`SignedHandler.signature_problem`; once a request's signature is
accepted, the answer carries :data:`~exo_lab.cluster.auth.HEADER_RESPONSE_SIG`, set when its headers go
out: over the status and the whole body when the answer is sent in one piece, over the status only
(:data:`~exo_lab.cluster.auth.STREAMED`) when it is streamed (the headers leave before the body is known).
A request that was not accepted (401) gets an unsigned answer.
"""

from __future__ import annotations

import logging
from asyncio import Future

import tornado.web

from exo_lab.cluster.auth import HEADER_NONCE, HEADER_RESPONSE_SIG, HEADER_SOURCE, Verifier, response_signature

log = logging.getLogger(__name__)


class SignedHandler(tornado.web.RequestHandler):
    """A request handler that signs its answer to a request whose signature it accepted."""

    _answer_key: str | None = None
    _answer_nonce: str | None = None

    def signature_problem(self, verifier: Verifier) -> str | None:
        """Why the request's signature is not accepted, or None (its answer will then be signed)."""
        r = self.request
        headers = dict(r.headers)
        problem = verifier.problem(r.method or "", r.uri or "", r.body or b"", headers)
        if problem is None:
            self._answer_key, self._answer_nonce = verifier.key, headers[HEADER_NONCE]
            if headers.get(HEADER_SOURCE):
                log.debug("%s %s signed by node %s", r.method, r.uri, headers[HEADER_SOURCE])
        return problem

    def sign_answer(self, body: bytes | None, *, body_sha256: str | None = None) -> None:
        """Sign the answer now: its status and ``body`` (or the hex SHA-256 ``body_sha256`` of the body it will
        send; neither: a streamed answer, the status only). Nothing happens for a request not accepted."""
        if self._answer_key and self._answer_nonce and not self._headers_written:
            status = self.get_status()
            sig = response_signature(self._answer_key, self._answer_nonce, status, body, body_sha256=body_sha256)
            self.set_header(HEADER_RESPONSE_SIG, sig)

    def flush(self, include_footers: bool = False) -> Future[None]:
        if not self._headers_written and HEADER_RESPONSE_SIG not in self._headers:
            # include_footers: called by finish(), the buffer is the whole body; otherwise the answer streams
            self.sign_answer(b"".join(self._write_buffer) if include_footers else None)
        return super().flush(include_footers)
