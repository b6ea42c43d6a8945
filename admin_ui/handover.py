"""An issued token's value, handed from the issue form's post to the page after it, once.

The post answers 303 (post/redirect/get) to ``/admin/tokens/issued/{form id}``, so reloading that
page, or sending the same form again, issues nothing more. Each rendering of the issue form
carries a random one-time form id. Which token each id issued, and whether its value has been
shown, is kept in the store, which every process and instance shares: behind a load balancer
(compose's nginx, one request to each instance in turn) or with several workers, the posts of one
form, and the pages after them, may each reach another process. The first post claims the id
there before issuing, so a form posted twice (a double click, a retry) issues one token and every
post is redirected to the same page; the page marks the value shown there before showing it.

The value itself travels in a cookie, sealed (AES-GCM under a key derived from ENCRYPTION_KEY and
the admin password) for that one page's path; the page opens it, shows it, and clears the cookie.
Every process and instance shares the key. The value is never stored (not even sealed: a token is
stored only as its hash), never put in a URL, never logged, and expires unshown after
``HANDOVER_SECONDS``. A post repeated just after the first, to the process that issued, gets the
sealed value again from that process's memory (see ``RESEND_SECONDS``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import time
from dataclasses import dataclass

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from admin_ui.security import CSRF_MAX_AGE_SECONDS

FORM_FIELD = "issue_id"
COOKIE = "llm_proxy_issued_token"
# Long enough to copy a value after a slow redirect; the page says what to do when it is gone.
HANDOVER_SECONDS = 600
# A form id is remembered for as long as its CSRF token could let the form be posted again.
REMEMBER_SECONDS = CSRF_MAX_AGE_SECONDS
# A repeated post gets the sealed value again only this soon after the first: a double click, whose
# first answer the browser dropped. Later, the page it led to has been shown.
RESEND_SECONDS = 30

_FORM_ID = re.compile(r"[A-Za-z0-9_-]{22}")


def new_form_id() -> str:
    """A fresh one-time id for a rendering of the issue form (128 random bits)."""
    return secrets.token_urlsafe(16)


def is_form_id(text: str) -> bool:
    return _FORM_ID.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class Handed:
    """What the page after the post needs: which token, and its value."""

    token_id: str
    project_id: str
    value: str


class Handovers:
    """Seals values into cookies, and keeps each sealed value here a few seconds for a repeated
    post of its form."""

    def __init__(self, secret: bytes, admin_password: str) -> None:
        key = hmac.new(
            secret, b"llm-proxy/admin-token-handover\n" + admin_password.encode(), hashlib.sha256
        ).digest()
        self._aead = AESGCM(key)
        # form id -> (sealed value, when), oldest first
        self._recent: dict[str, tuple[str, float]] = {}

    def finish(self, form_id: str, handed: Handed, user: str, now: float | None = None) -> str:
        """The sealed value of the token ``form_id`` issued, for the cookie; kept for
        :meth:`resendable`."""
        at = time.monotonic() if now is None else now
        self._forget_old(at)
        sealed = self.seal(form_id, handed, user)
        self._recent[form_id] = (sealed, at)
        return sealed

    def resendable(self, form_id: str, now: float | None = None) -> str | None:
        """The sealed value ``form_id`` issued in this process, within ``RESEND_SECONDS``."""
        recent = self._recent.get(form_id)
        at = time.monotonic() if now is None else now
        if recent is None or at - recent[1] > RESEND_SECONDS:
            return None
        return recent[0]

    # -- sealing -------------------------------------------------------------------------------

    def seal(self, form_id: str, handed: Handed, user: str, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + HANDOVER_SECONDS)
        plain = orjson.dumps(
            {"t": handed.token_id, "p": handed.project_id, "v": handed.value, "e": expires}
        )
        nonce = os.urandom(12)
        sealed = nonce + self._aead.encrypt(nonce, plain, _bound(form_id, user))
        return base64.urlsafe_b64encode(sealed).decode().rstrip("=")

    def open(self, sealed: str, form_id: str, user: str, now: float | None = None) -> Handed | None:
        """The value sealed for ``form_id`` and ``user``; None when forged, for another page or
        user, or expired."""
        try:
            raw = base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4))
            plain = self._aead.decrypt(raw[:12], raw[12:], _bound(form_id, user))
            fields = orjson.loads(plain)
        except (binascii.Error, ValueError, InvalidTag):
            return None
        if fields["e"] < (time.time() if now is None else now):
            return None
        return Handed(token_id=fields["t"], project_id=fields["p"], value=fields["v"])

    def _forget_old(self, now: float) -> None:
        # Insertion order is age order: drop from the front what is too old to be sent again.
        while self._recent:
            form_id, (_, at) = next(iter(self._recent.items()))
            if now - at <= RESEND_SECONDS:
                break
            del self._recent[form_id]


def _bound(form_id: str, user: str) -> bytes:
    """What a sealed value is bound to: its page and the admin user it was issued to."""
    return f"{form_id}\n{user}".encode()
