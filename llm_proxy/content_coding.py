"""Undo a body's content coding (gzip, deflate, br, zstd), within a bound on what it decodes to.

Events decode the answers they capture, which may have been cut at the capture limit: a truncated
stream yields the prefix it holds and says so. The proxy path decodes an upstream error answer
whole to mask the project's key in it, and refuses one that comes out cut.
"""

from __future__ import annotations

import importlib
import zlib
from dataclasses import dataclass
from types import ModuleType

import zstandard

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
    # Incremental, frame after frame, as a truncated capture holds whole blocks only. A
    # decompressobj per frame (read_across_frames never says a frame ended): a body that ends
    # inside one yields its whole blocks and is said cut, as gzip's is. Read by offsets, never by
    # copying what is left: a body of tiny frames (1 MiB of empty ones) stays a linear pass.
    context = zstandard.ZstdDecompressor()  # one per call: a context is not for two threads
    data = bytearray()
    view = memoryview(raw)
    start = 0
    while True:
        decompressor = context.decompressobj()
        at = start
        while at < len(raw) and not decompressor.eof:
            piece = view[at : at + _ZSTD_PIECE]
            data += decompressor.decompress(piece)
            at += len(piece)
            if len(data) >= limit:
                return bytes(data[:limit]), True
        if not decompressor.eof:
            return bytes(data), True
        start = at - len(decompressor.unused_data)
        if start >= len(raw):
            return bytes(data), False


def codings(content_encoding: str) -> list[str]:
    """The codings a Content-Encoding value lists, lower-cased, in the order applied."""
    return [c.strip().lower() for c in content_encoding.split(",") if c.strip()]


def decode(raw: bytes, content_encoding: str, *, truncated: bool, limit: int) -> Decoded:
    """Undo ``content_encoding`` (outermost coding last in the header, so applied in reverse)."""
    if not content_encoding:
        return Decoded(raw, truncated)  # most answers: nothing to undo, nothing to split
    data = raw
    for coding in reversed(codings(content_encoding)):
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
