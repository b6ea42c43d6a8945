"""Who may use the admin pages (HTTP basic auth) and proof that a form came from them (CSRF)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from urllib.parse import urlsplit

from llm_proxy.crypto import secrets_match

REALM = "llm-proxy admin"
CSRF_FIELD = "csrf_token"
CSRF_MAX_AGE_SECONDS = 12 * 3600
# What CsrfSigner.issue writes: ASCII digits, a dot, a hex digest. Anything else is refused before
# it is parsed: int() refuses digits str.isdigit() accepts ("²") and more than 4300 of them, and
# hmac.compare_digest() refuses text that is not ASCII.
_CSRF_SHAPE = re.compile(r"([0-9]{1,20})\.([0-9a-f]{64})")


def check_basic_auth(header: str | None, user: str, password: str) -> bool:
    """True when ``Authorization: Basic …`` names exactly this user and password."""
    scheme, _, encoded = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    given_user, sep, given_password = decoded.partition(b":")
    # Both compared every time, so the answer takes as long for a wrong user as for a wrong password.
    user_ok = secrets_match(given_user, user.encode())
    password_ok = secrets_match(given_password, password.encode())
    return bool(sep) and user_ok and password_ok


# What a browser says of a request its own user started: on a page of the same origin, or typed
# in, bookmarked, reloaded ("none").
_OWN_FETCH_SITES = frozenset({"same-origin", "none"})


def cross_site_reason(
    sec_fetch_site: str | None, origin: str | None, host: str | None
) -> str | None:
    """None unless the browser says the post comes from another site's page; then why, in words.

    The browser sends the admin's basic credentials with a post whoever's page makes it, so the
    form token alone would let a page elsewhere post with one that leaked (a saved page, a
    screenshot). Browsers name the page's site in ``Sec-Fetch-Site``; older ones only send
    ``Origin``, compared with the ``Host`` asked for. A client that sends neither is no browser
    acting for someone else (curl, scripts) and is left to the form token.
    """
    if sec_fetch_site is not None:
        if sec_fetch_site.strip().lower() in _OWN_FETCH_SITES:
            return None
        return "The form was sent from another site's page."
    if origin is None:
        return None
    if (
        origin.strip().lower() != "null"
        and urlsplit(origin.strip()).netloc.lower() == (host or "").lower()
    ):
        return None
    return "The form was sent from another site's page."


class CsrfSigner:
    """Stateless CSRF tokens: ``<unix time>.<HMAC(key, user, time)>``.

    The key is derived from settings every worker shares (the encryption key and the admin
    password), not from a per-process random secret, so a form rendered by one worker behind
    ``reuse_port`` is accepted by another; changing the admin password voids every open form.
    """

    def __init__(self, secret: bytes, admin_password: str, *, max_age: float) -> None:
        self._key = hmac.new(
            secret, b"llm-proxy/admin-csrf\n" + admin_password.encode(), hashlib.sha256
        ).digest()
        self._max_age = max_age

    def _sign(self, user: str, issued: int) -> str:
        message = f"{user}\n{issued}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def issue(self, user: str, now: float | None = None) -> str:
        issued = int(time.time() if now is None else now)
        return f"{issued}.{self._sign(user, issued)}"

    def verify(self, token: str, user: str, now: float | None = None) -> str | None:
        """None when valid; otherwise why not, in words for the operator."""
        shape = _CSRF_SHAPE.fullmatch(token)
        if shape is None:
            return "The form carried no valid security token."
        issued = int(shape[1])
        if not hmac.compare_digest(shape[2], self._sign(user, issued)):
            return "The form's security token does not match."
        age = (time.time() if now is None else now) - issued
        if age > self._max_age or age < -60:
            return "The form has expired."
        return None
