"""Token values and upstream keys: what is stored, and how.

Token values are stored only as SHA-256 hex digests (they are 256-bit random, so a fast hash is
enough; a slow KDF would put milliseconds on every cache miss). Upstream keys are encrypted with
AES-256-GCM under ``ENCRYPTION_KEY`` with a fresh 96-bit nonce each time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib
import os
import re
import secrets
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import unquote

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

TOKEN_PREFIX = "sk-"
# 32 random bytes → 43 base64url characters; anything of another shape is refused before lookup.
_TOKEN_SHAPE = re.compile(r"sk-[A-Za-z0-9_-]{22,200}")
# A key starts a word: "risk-assessment-framework" or "task-management" holds none. A letter
# before it is allowed only when it ends an escape: a line break in JSON text ("\\n"), or a
# percent-encoded separator ("%2Fsk-…", "%20sk-…").
_SECRET_LIKE = re.compile(
    r"(?:(?<![A-Za-z_-])|(?<=\\[nrtbf])|(?<=%[0-9A-Fa-f]{2}))(sk-|mgmt-)[A-Za-z0-9_-]{8,}"
)
# An upstream key goes out as a header value, where a CR or LF would end the header and start
# another (the upstream client refuses to send a line break at all). No key has any of the
# control characters (C0, DEL, C1), so all of them are refused alike.
_UNSENDABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def new_token_value() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def secrets_match(given: bytes, expected: bytes) -> bool:
    """Whether a credential a client sent is the secret, in a time that reveals neither.

    ``hmac.compare_digest`` returns at once when the lengths differ, which tells a guesser an
    operator-chosen password's length; comparing fixed-length digests of both sides does not.
    """
    return hmac.compare_digest(hashlib.sha256(given).digest(), hashlib.sha256(expected).digest())


def is_token_shaped(value: str) -> bool:
    return _TOKEN_SHAPE.fullmatch(value) is not None


def is_sendable_key(key: str) -> bool:
    """Whether an upstream key can be sent as it is in an ``Authorization`` header."""
    return _UNSENDABLE.search(key) is None


def _builtin_sha256() -> Callable[[bytes], Any]:
    """CPython's own SHA-256 (HACL*; the same digests), else hashlib's (OpenSSL's).

    Every proxied request hashes its token, and a proxy between requests is a cold one: in the
    time a stream takes, other processes turn the CPU's caches over. Cold, OpenSSL's digest
    (fetched through its provider machinery on every call in Python 3.11) took ~22 µs of the
    request path and this one ~6; hot, both take ~0.3 µs (bench/README.md, "The request path
    between streams").
    """
    for module in ("_sha2", "_sha256"):  # its name from Python 3.12 on, and before
        try:
            return cast(Callable[[bytes], Any], importlib.import_module(module).sha256)
        except (ImportError, AttributeError):
            continue
    return hashlib.sha256


_sha256 = _builtin_sha256()


def hash_token(value: str) -> str:
    """The SHA-256 hex digest a token is stored and looked up by."""
    digest: str = _sha256(value.encode()).hexdigest()
    return digest


# A masked key shows at most this share of its characters: the first 5 and last 4 of a key of 27
# or more (every OpenAI key), fewer of a shorter one, its end first.
_SHOWN_SHARE = 3


def mask_key(key: str) -> str:
    """``sk-ab…wxyz``: enough to recognise a key, not enough to use it (never more than a third
    of it)."""
    shown = len(key) // _SHOWN_SHARE
    tail = min(4, shown)
    head = min(5, shown - tail)
    return f"{key[:head]}…{key[len(key) - tail :]}"


def mask_key_start(key: str, kept: int) -> str:
    """``sk-ab…``: what shows of ``key`` where a text cut it after its first ``kept`` characters,
    no more of its start than :func:`mask_key` shows, and nothing past it."""
    shown = len(key) // _SHOWN_SHARE
    head = min(5, shown - min(4, shown), kept)
    return f"{key[:head]}…"


def same_length_mask(key: bytes) -> bytes:
    """``key`` starred but for its first 3 and last 4 bytes (at most a third of it): as long as the
    key, so that a masked body keeps its length and a masked head its framing."""
    shown = min(7, len(key) // 3)
    tail = min(4, shown)
    return key[: shown - tail] + b"*" * (len(key) - shown) + key[len(key) - tail :]


def redact(text: str) -> str:
    """Mask anything that looks like a token or key inside free text."""
    return _SECRET_LIKE.sub(lambda m: mask_key(m.group(0)), text)


# How many times a path quoted in a message is decoded to look for a key, as a reader (or a log
# viewer, or a browser) may decode what it shows more than once.
_PATH_DECODINGS = 3


def redact_path(path: str) -> str:
    """``path`` with anything that looks like a token or key masked, percent-encoded ones too
    (``/v1/%73k-…``, ``/v1/sk%2D…``, encoded twice): shown decoded, and masked, when decoding
    reveals one; else as it was given. For messages and events that quote a path; the requests
    that are let through never pay for it."""
    decoded = path
    for _ in range(_PATH_DECODINGS):
        if "%" not in decoded:
            break
        decoded = unquote(decoded, errors="replace")
    masked = redact(decoded)
    if masked == decoded:
        return redact(path)
    # A key that decoding joined to a letter before it ("%41sk-…") no longer starts a word.
    for found in _SECRET_LIKE.finditer(path):
        masked = masked.replace(found.group(0), mask_key(found.group(0)))
    return masked


class DecryptionError(Exception):
    """The stored ciphertext does not open with the configured ``ENCRYPTION_KEY``."""


class KeyCipher:
    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def encrypt(self, plaintext: str) -> str:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), b"llm-proxy/api-key")
        return base64.b64encode(nonce + sealed).decode()

    def decrypt(self, stored: str) -> str:
        try:
            raw = base64.b64decode(stored, validate=True)
            return self._aead.decrypt(raw[:12], raw[12:], b"llm-proxy/api-key").decode()
        except (InvalidTag, ValueError) as exc:  # (binascii.Error, a damaged value, is one)
            raise DecryptionError("upstream key does not decrypt with ENCRYPTION_KEY") from exc
