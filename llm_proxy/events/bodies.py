"""Turn captured body bytes into what an event shows: decoded, parsed JSON where possible.

The proxy tees the bytes exactly as they flowed, so a response may still carry its content coding
and may have been cut at the capture limit. Everything here tolerates both: a truncated gzip stream
yields the prefix it holds, and a body that is no longer valid JSON is shown as text.
"""

from __future__ import annotations

import importlib
import zlib
from dataclasses import dataclass
from types import ModuleType

import orjson
import zstandard

from llm_proxy.crypto import mask_key, redact

# Brotli is optional: OpenAI answers ``br`` only to clients that offer it. Without a brotli module
# the body stays undecoded and the event says so, rather than the pipeline failing.
_BROTLI_MODULES = ("brotli", "brotlicffi")


def _load_brotli() -> ModuleType | None:
    for name in _BROTLI_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


_brotli = _load_brotli()

DEFAULT_DECODED_LIMIT = 16 * 1024 * 1024  # a decompression bomb stops here

# orjson reads JSON of any depth but writes at most _WRITABLE_DEPTH levels. An event holds a body
# one level down, and the dead-letter file and the backends wrap events a few levels more: a body
# nested deeper than MAX_DEPTH is shown as its text, so that every event can always be written.
MAX_DEPTH = 128
_WRITABLE_DEPTH = 254
# Levels a reassembled stream puts around the payloads it was parsed from (choices, message, ...).
_REASSEMBLY_LEVELS = 8


@dataclass(slots=True)  # not frozen: one or more per event, and a frozen __init__ costs more
class Decoded:
    data: bytes | None  # None when the content coding could not be undone
    truncated: bool
    note: str | None = None


def _inflate(raw: bytes, wbits: int, limit: int) -> tuple[bytes, bool]:
    inflater = zlib.decompressobj(wbits)
    data = inflater.decompress(raw, limit)
    cut = bool(inflater.unconsumed_tail) or not inflater.eof
    return data, cut


def _unbrotli(raw: bytes, limit: int) -> tuple[bytes, bool]:
    assert _brotli is not None
    # The incremental decompressor returns what a truncated stream holds instead of raising.
    decompressor = _brotli.Decompressor()
    try:
        data = bytes(decompressor.process(raw, output_buffer_limit=limit))
    except TypeError:  # brotli < 1.2 and brotlicffi cannot bound the output
        data = bytes(decompressor.process(raw))
    finished = getattr(decompressor, "is_finished", lambda: True)()
    return data[:limit], len(data) >= limit or not finished


# Compressed bytes handed to zstd at a time: a piece this size yields at most ~8 MiB (RLE blocks of
# 128 KiB in 4 bytes each), so a bomb overshoots the limit by no more than that.
_ZSTD_PIECE = 256


def _unzstd(raw: bytes, limit: int) -> tuple[bytes, bool]:
    # Incremental, across frames, as a truncated capture holds whole blocks only.
    decompressor = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)
    data = bytearray()
    for at in range(0, len(raw), _ZSTD_PIECE):
        data += decompressor.decompress(raw[at : at + _ZSTD_PIECE])
        if len(data) >= limit:
            return bytes(data[:limit]), True
    return bytes(data), False


def decode(raw: bytes, content_encoding: str, *, truncated: bool, limit: int) -> Decoded:
    """Undo ``content_encoding`` (outermost coding last in the header, so applied in reverse)."""
    if not content_encoding:
        return Decoded(raw, truncated)  # most answers: nothing to undo, nothing to split
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    data = raw
    for coding in reversed(codings):
        try:
            if coding in ("gzip", "x-gzip"):
                data, cut = _inflate(data, zlib.MAX_WBITS | 16, limit)
            elif coding == "deflate":
                # Servers disagree on whether "deflate" has a zlib header; try with, then raw.
                try:
                    data, cut = _inflate(data, zlib.MAX_WBITS, limit)
                except zlib.error:
                    data, cut = _inflate(data, -zlib.MAX_WBITS, limit)
            elif coding == "br" and _brotli is not None:
                data, cut = _unbrotli(data, limit)
            elif coding == "zstd":
                data, cut = _unzstd(data, limit)
            elif coding == "identity":
                cut = False
            else:
                return Decoded(None, truncated, f"content-encoding {coding} not decoded")
        except Exception as exc:  # zlib.error, brotli.error: a corrupt body must not stop the event
            return Decoded(
                None, truncated, f"content-encoding {coding} failed: {type(exc).__name__}"
            )
        truncated = truncated or cut
    return Decoded(data, truncated)


def without_secrets(data: bytes) -> bytes:
    """``data`` with anything shaped like a key masked: a client may paste its token or a key
    into a prompt or where the model goes, and some upstreams word an error by quoting the key
    they refused, whole. Bodies that do not hold one are not copied."""
    if b"sk-" not in data and b"mgmt-" not in data:
        return data
    return redact(data.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")


def without_key(data: bytes, key: bytes) -> bytes:
    """``data`` with every occurrence of ``key`` (the project's own, whatever its shape) masked."""
    if not key or key not in data:
        return data
    masked = mask_key(key.decode("utf-8", "surrogateescape"))
    return data.replace(key, masked.encode("utf-8", "surrogateescape"))


def text_without_secrets(text: str) -> str:
    """``text`` with anything shaped like a key masked, as :func:`without_secrets` does bodies:
    for an event's path (a key where an id goes: ``/v1/files/sk-…``) and its model."""
    if "sk-" not in text and "mgmt-" not in text:
        return text
    return redact(text)


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
