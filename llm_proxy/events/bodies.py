"""Turn captured body bytes into what an event shows: decoded, parsed JSON where possible.

The proxy tees the bytes exactly as they flowed, so a response may still carry its content coding
and may have been cut at the capture limit. Everything here tolerates both: a truncated gzip stream
yields the prefix it holds, and a body that is no longer valid JSON is shown as text.
"""

from __future__ import annotations

import orjson

# The decoders live a layer down, where the proxy path decodes error answers with them too.
from llm_proxy.content_coding import Decoded as Decoded
from llm_proxy.content_coding import decode as decode
from llm_proxy.crypto import mask_key, mask_key_start, redact, redact_path

DEFAULT_DECODED_LIMIT = 16 * 1024 * 1024  # a decompression bomb stops here
# The shortest start of the project's key masked where a body ends: every mask shows a key's first
# three characters, so fewer say nothing of it, and a body ending in them by chance is left alone.
_KEY_START_MASKED = 4

# orjson reads JSON of any depth but writes at most _WRITABLE_DEPTH levels. An event holds a body
# one level down, and the dead-letter file and the backends wrap events a few levels more: a body
# nested deeper than MAX_DEPTH is shown as its text, so that every event can always be written.
MAX_DEPTH = 128
_WRITABLE_DEPTH = 254
# Levels a reassembled stream puts around the payloads it was parsed from (choices, message, ...).
_REASSEMBLY_LEVELS = 8


def without_secrets(data: bytes) -> bytes:
    """``data`` with anything shaped like a key masked: a client may paste its token or a key
    into a prompt or where the model goes, and some upstreams word an error by quoting the key
    they refused, whole. Bodies that do not hold one are not copied."""
    if b"sk-" not in data and b"mgmt-" not in data:
        return data
    return redact(data.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")


def without_key(data: bytes, key: bytes) -> bytes:
    """``data`` with every occurrence of ``key`` (the project's own, whatever its shape) masked,
    and the start of it that ends ``data`` where a cut fell inside it: the capture's limit, a
    decoder at the end of a stream cut short, an upstream gone mid-body. Masked whether or not the
    body is known to be cut (an upstream gone mid-body leaves a capture that looks whole)."""
    if not key or key[:_KEY_START_MASKED] not in data:
        # Neither the key nor a start of it long enough to mask: the case of nearly every
        # answer, which since every answer's event is masked (an upstream may echo the key in a
        # 2xx) is worth one search instead of the work below.
        return data
    text = key.decode("utf-8", "surrogateescape")
    if key in data:
        data = data.replace(key, mask_key(text).encode("utf-8", "surrogateescape"))
    cut = _key_start_at_end(data, key)
    if cut < 0:
        return data
    shown = mask_key_start(text, len(data) - cut)
    return data[:cut] + shown.encode("utf-8", "surrogateescape")


def _key_start_at_end(data: bytes, key: bytes) -> int:
    """Where the longest start of ``key`` (at least :data:`_KEY_START_MASKED` bytes long, and
    short of the whole key) that ends ``data`` begins; -1 when none does."""
    end = data[-(len(key) - 1) :] if len(key) > 1 else b""
    offset = len(data) - len(end)
    first = key[:_KEY_START_MASKED]
    at = end.find(first)
    while at >= 0:
        if key.startswith(end[at:]):
            return offset + at
        at = end.find(first, at + 1)
    return -1


def text_without_secrets(text: str) -> str:
    """``text`` with anything shaped like a key masked, as :func:`without_secrets` does bodies:
    for an event's path (a key where an id goes: ``/v1/files/sk-…``) and its model."""
    if "sk-" not in text and "mgmt-" not in text:
        return text
    return redact(text)


def path_without_secrets(path: str) -> str:
    """An event's path with anything shaped like a key masked, also where an escape the
    normalising left in it (a path encoded twice) hides one."""
    return text_without_secrets(path) if "%" not in path else redact_path(path)


def show(decoded: Decoded, raw_size: int) -> object:
    """The JSON value of a body, else its text, else a bracketed note saying why it is not shown."""
    if decoded.data is None:
        return f"[body not decoded: {decoded.note}; {raw_size} bytes]"
    data = decoded.data
    if not data:
        return None
    if data[:64].lstrip()[:1] in (b"{", b"["):
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
        else:
            if shallow(value, data):
                return value
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        if decoded.truncated:
            # The capture limit may have split a multi-byte character: drop the partial tail only.
            try:
                return data[: _utf8_boundary(data)].decode("utf-8")
            except UnicodeDecodeError:
                pass
        return f"[binary body: {len(data)} bytes]"


def shallow(value: object, data: bytes) -> bool:
    """Whether ``value``, parsed from ``data``, nests no deeper than :data:`MAX_DEPTH`."""
    # A value nests no deeper than its text has brackets, counted in C: most bodies stop here.
    if data.count(b"{") + data.count(b"[") + _REASSEMBLY_LEVELS <= MAX_DEPTH:
        return True
    # Else let orjson find out, as it writes the value below as many levels as may be added.
    wrapped = value
    for _ in range(_WRITABLE_DEPTH - MAX_DEPTH):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped)
    except orjson.JSONEncodeError:
        return False
    return True


def shed_note(size: int) -> str:
    """What an event shows for a body the server left out because the events process was behind."""
    return f"[body not kept: the events process was behind; {size} bytes]"


def _utf8_boundary(data: bytes) -> int:
    """Length of ``data`` without a trailing incomplete UTF-8 sequence (at most 3 bytes)."""
    end = len(data)
    for back in range(1, min(4, end) + 1):
        byte = data[end - back]
        if byte & 0xC0 != 0x80:  # the lead byte of the last sequence
            return end - back
    return end
