"""An issued token's value, handed from the issue form's post to the page after it, once.

The post answers 303 (post/redirect/get) to ``/admin/tokens/issued/{form id}``, so reloading that
page, or sending the same form again, issues nothing more. Each rendering of the issue form
carries a random one-time form id; this process remembers which token each id issued, so a form
posted twice (a double click, a retry) issues one token and is redirected to the same page.

The value itself travels in a cookie, sealed (AES-GCM under a key derived from ENCRYPTION_KEY and
the admin password) for that one page's path; the page opens it, shows it, and clears the cookie.
A cookie rather than this process's memory because behind a load balancer (compose's nginx, one
request to each instance in turn) or with several workers the page may well be asked of another
process than the one that issued the token, and every process and instance shares the key. The
value is never put in a URL, never logged, and expires unshown after ``HANDOVER_SECONDS``.
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
MAX_REMEMBERED = 10_000

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


@dataclass(slots=True)
class _Issued:
    token_id: str
    sealed: str
    at: float
    shown: bool = False


class Handovers:
    """Seals values into cookies and remembers, in this process, what each form id issued."""

    def __init__(self, secret: bytes, admin_password: str) -> None:
        key = hmac.new(
            secret, b"llm-proxy/admin-token-handover\n" + admin_password.encode(), hashlib.sha256
        ).digest()
        self._aead = AESGCM(key)
        self._issued: dict[str, _Issued] = {}
        self._pending: set[str] = set()

    # -- the form's post -----------------------------------------------------------------------

    def begin(self, form_id: str, now: float | None = None) -> bool:
        """Claim ``form_id`` for issuing; False when it issued a token already or is issuing
        one now (see :meth:`earlier`)."""
        self._forget_old(time.monotonic() if now is None else now)
        if form_id in self._issued or form_id in self._pending:
            return False
        self._pending.add(form_id)
        return True

    def abandon(self, form_id: str) -> None:
        """Issuing failed (a field, an inactive project): the form may be posted again."""
        self._pending.discard(form_id)

    def finish(self, form_id: str, handed: Handed, user: str, now: float | None = None) -> str:
        """Record the token ``form_id`` issued; the sealed value, for the cookie."""
        self._pending.discard(form_id)
        sealed = self.seal(form_id, handed, user)
        self._issued[form_id] = _Issued(
            handed.token_id, sealed, time.monotonic() if now is None else now
        )
        return sealed

    def earlier(self, form_id: str, now: float | None = None) -> tuple[str | None, str | None]:
        """For a form posted again: the token it issued (None while the first post is still
        issuing) and the sealed value to send again (None unless within ``RESEND_SECONDS``)."""
        issued = self._issued.get(form_id)
        if issued is None:
            return None, None
        age = (time.monotonic() if now is None else now) - issued.at
        resend = not issued.shown and age <= RESEND_SECONDS
        return issued.token_id, issued.sealed if resend else None

    # -- the page after it ---------------------------------------------------------------------

    def shown(self, form_id: str, token_id: str, now: float | None = None) -> None:
        """The value was shown by this process (issued here or not): never again."""
        issued = self._issued.get(form_id)
        if issued is None:
            at = time.monotonic() if now is None else now
            issued = self._issued[form_id] = _Issued(token_id, "", at)
        issued.shown = True

    def was_shown(self, form_id: str) -> bool:
        issued = self._issued.get(form_id)
        return issued is not None and issued.shown

    def token_of(self, form_id: str) -> str | None:
        """The token ``form_id`` issued, when this process issued it."""
        issued = self._issued.get(form_id)
        return None if issued is None else issued.token_id

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
        # Insertion order is age order: drop from the front what is too old, or too many.
        while self._issued:
            form_id, issued = next(iter(self._issued.items()))
            if now - issued.at <= REMEMBER_SECONDS and len(self._issued) < MAX_REMEMBERED:
                break
            del self._issued[form_id]


def _bound(form_id: str, user: str) -> bytes:
    """What a sealed value is bound to: its page and the admin user it was issued to."""
    return f"{form_id}\n{user}".encode()
