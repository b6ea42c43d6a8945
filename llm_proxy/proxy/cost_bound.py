"""The most a request can cost, for reserving a token's budget before the request is forwarded.

`prompt_token_bound` gives an upper bound of the prompt tokens the upstream can bill for a JSON
request body, and `with_output_cap` adds an output cap to a body that has none, so that the output
is bounded too.

The prompt bound is counted from the raw bytes, never from a parsed dict: a body may repeat a key
(``{"content":"<huge>","content":"hi"}``) and the upstream's parser may keep either value, so every
string literal counts, keys and values alike. Each one is decoded and counted with the model's
real tiktoken encoder, plus `PER_MEMBER` or `PER_ELEMENT`; numbers, objects and arrays add fixed
amounts. This over-counts plain chat by a few tokens per message (keys such as ``"role"``
are not billed), which is the price of never under-counting: OpenAI renders chat messages with
3-4 tokens of framing each and tool schemas in a TypeScript-like form whose enum items cost 3
tokens plus their text, all of which the per-literal and per-object amounts cover.

What cannot be counted from the text gets a fixed bound per occurrence (`IMAGE_BOUND`,
`FILE_BOUND`, `STORED_STATE_BOUND`, `HOSTED_TOOL_BOUND`); a string in an image or file slot
(a base64 ``data:`` URL, an image URL, inline file data) is then not counted as text.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

import orjson

from llm_proxy import tokens

OUTPUT_CAP_FIELDS: Final[dict[str, str]] = {
    "/v1/chat/completions": "max_completion_tokens",
    "/v1/responses": "max_output_tokens",
    "/v1/completions": "max_tokens",
}
"""Normalised path -> the output-cap field the proxy adds to a body that has no output cap."""

CAP_FIELDS: Final = ("max_tokens", "max_completion_tokens", "max_output_tokens")
"""Every field that caps a request's output, on any endpoint."""

HONOURED_CAPS: Final[dict[str, tuple[str, ...]]] = {
    "/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
    "/v1/completions": ("max_tokens",),
    "/v1/responses": ("max_output_tokens",),
}
"""Normalised path -> the cap fields its endpoint reads (chat its older max_tokens too): a cap in
another field bounds nothing."""

IMAGE_BOUND: Final = 25_000
"""Tokens per occurrence of the string ``image_url``, ``input_image`` or ``computer_screenshot``.

One image shows two of them (chat: ``{"type":"image_url","image_url":{...}}``; Responses:
``{"type":"input_image","image_url":...}``), so it is bounded by 50,000. The dearest image is a
high-detail one on gpt-4o-mini: scaled into 2048x2048 and then to a shortest side of 768 px it
covers at most 2 x 4 tiles of 512 px, at 2,833 + 8 x 5,667 = 48,169 tokens. Other models bill
far less (gpt-4o 1,445; patch-based models at most 1,536 patches x 2.46)."""

FILE_BOUND: Final = 100_000
"""Tokens per ``file_id``, ``file_data`` or ``file_url`` key (with a non-null value): a file's
text plus, for a PDF, an image of every page. Not a strict bound for a long PDF, whose pages can
add up to more; the model's context window is the only limit there."""

STORED_STATE_BOUND: Final = 1_048_576
"""Tokens per ``previous_response_id`` or ``conversation`` key with a non-null value, or
``prompt`` key with an object value (a stored prompt template): stored state the upstream
prepends to the prompt and the body does not show. The largest OpenAI context window."""

HOSTED_TOOL_BOUND: Final = 1_048_576
"""Tokens per hosted tool the upstream runs itself and feeds back into the prompt (``"type"`` of
``web_search*``, ``file_search``, ``code_interpreter`` or ``mcp``; the chat ``web_search_options``
key): search results and tool output are billed as prompt tokens. One context window per tool;
a model that calls a tool many times in one response can bill more."""

PER_OBJECT: Final = 4
"""Tokens per ``{``: the framing of a chat message (3, or 4 with a name) or of a tool schema."""

PER_MEMBER: Final = 1
"""Tokens per key or object member value on top of its text."""

PER_ELEMENT: Final = 3
"""Tokens per string in an array on top of its text: an enum item of a tool schema is rendered
quoted and joined with `` | ``, 3 tokens more than its text (OpenAI cookbook)."""

PER_NUMBER: Final = 2
"""Tokens per number on top of its digits (at most one per 3 digits and per other character): a
tool schema's numeric enum is rendered as ``1000 | 2000``, where `` |`` and the space before a
digit are tokens of their own. Integers in a ``prompt`` or ``input`` array are token ids: one
token each."""

PER_ARRAY: Final = 1
"""Tokens per ``[`` (``string[]`` in a rendered schema)."""

REPLY_PRIMING: Final = 3
"""Every reply is primed with ``<|start|>assistant<|message|>``."""

TEXT_CHUNK: Final = 16_384
"""Longest piece of text handed to tiktoken at once: its regex fails with a stack overflow on
about a million spaces. Cutting a text costs at most one extra token per cut, which is added."""

_TOKEN_ARRAY_KEYS: Final = frozenset({"prompt", "input"})
"""Keys whose integer arrays are pre-tokenised text: one token per integer."""
_IMAGE_STRINGS: Final = frozenset({"image_url", "input_image", "computer_screenshot"})
_FILE_KEYS: Final = frozenset({"file_id", "file_data", "file_url"})
_STATE_KEYS: Final = frozenset({"previous_response_id", "conversation"})
_HOSTED_TOOL_TYPES: Final = re.compile(
    r"web_search(?:_preview)?(?:_\d{4}_\d{2}_\d{2})?|file_search|code_interpreter|mcp"
)
_HOSTED_TOOL_KEYS: Final = frozenset({"web_search_options"})
_SLOT_KEYS: Final = frozenset({"image_url", "file_data"})
"""Keys whose string value is an image or a file, bounded by its key, never text."""

_STRING: Final = re.compile(rb'"((?:[^"\\]++|\\.)*+)"(?:(?=[ \t\r\n]*:[ \t\r\n]*(.))|)', re.DOTALL)
"""A string literal: group 1 its body; group 2, when it is a key, the first byte of its value."""
_NUMBER: Final = re.compile(rb"-?[0-9][0-9.eE+-]*")
_NUMBER_PIECE: Final = re.compile(rb"[0-9]{1,3}|[^0-9]")
"""A number's text costs at most one token per group of up to 3 digits and per other character."""
_LITERAL: Final = re.compile(rb"true|false|null")
_WS: Final = b" \t\r\n"
_SHORT: Final = 64
"""Strings up to this many characters may be keys or markers; their counts are cached."""

# The shape of the JSON text between two string literals (see `_gap`), as bit flags.
_COLON: Final = 1  # only a colon: the next string is the value of the previous one
_OPENS_OBJECT: Final = 2  # only a colon and "{": the previous key's value is an object
_BRACES: Final = 4  # opens or closes an object


def prompt_token_bound(body: bytes, model: str | None) -> int:
    """An upper bound of the prompt tokens the upstream can bill for this JSON request body,
    whatever the endpoint. ``body`` must be a well-formed JSON object; ``model`` picks the
    tiktoken encoding. Takes some 50-60 ms per MB of ordinary text (up to 0.5 s per MB of crafted
    text): run large bodies in a worker thread (tiktoken releases the GIL)."""
    encode = tokens.encoding(tokens.encoding_name(model)).encode_ordinary
    strings: dict[bytes, tuple[int, str]] = {}  # short strings (keys, roles, types) repeat
    gaps: dict[bytes, tuple[int, int]] = {}

    total = REPLY_PRIMING
    key = ""  # the previous string literal if it was a key, else ""
    in_image = False  # inside the object value of an "image_url" key
    pos = 0
    for match in _STRING.finditer(body):
        start, end = match.span()
        gap = body[pos:start]
        pos = end
        if key in _TOKEN_ARRAY_KEYS:
            cost, shape = _structure_tokens(gap, key), 0
        else:
            known = gaps.get(gap)
            if known is None:
                known = _gap(gap)
                if len(gap) <= _SHORT:
                    gaps[gap] = known
            cost, shape = known
        total += cost
        if key == "image_url" and shape & _OPENS_OBJECT:
            in_image = True
        elif shape & _BRACES:
            in_image = False
        value_of = key if shape & _COLON else ""
        key = ""
        value_start = match.group(2)
        total += PER_MEMBER if value_of or value_start is not None else PER_ELEMENT
        if value_of in _SLOT_KEYS or (value_of == "url" and in_image):
            continue  # an image or a file, bounded by the key that holds it

        raw = match.group(1)
        cached = strings.get(raw) if len(raw) <= _SHORT else None
        if cached is None:
            text = _decode(raw)
            if len(text) > _SHORT:
                total += _text_tokens(encode, text)
                continue  # no key or marker is this long (escapes make short text long)
            cached = (len(encode(text)), text)
            if len(raw) <= _SHORT:
                strings[raw] = cached
        count, text = cached
        total += count
        if text in _IMAGE_STRINGS:
            total += IMAGE_BOUND
        if value_start is None:
            if value_of == "type" and _HOSTED_TOOL_TYPES.fullmatch(text):
                total += HOSTED_TOOL_BOUND
            continue
        key = text
        if value_start == b"n":  # null
            continue
        if text in _FILE_KEYS:
            total += FILE_BOUND
        if text in _STATE_KEYS or (text == "prompt" and value_start == b"{"):
            total += STORED_STATE_BOUND
        if text in _HOSTED_TOOL_KEYS:
            total += HOSTED_TOOL_BOUND
    return total + _structure_tokens(body[pos:], key)


def _text_tokens(encode: Callable[[str], list[int]], text: str) -> int:
    """Tokens of a long text, counted in pieces of `TEXT_CHUNK` plus one per cut."""
    cuts = range(0, len(text), TEXT_CHUNK)
    return sum(len(encode(text[i : i + TEXT_CHUNK])) for i in cuts) + len(cuts) - 1


def _decode(raw: bytes) -> str:
    """The text of a string literal's body; its escaped form if it does not decode (lone
    surrogates), which only over-counts."""
    if b"\\" in raw:
        try:
            text = orjson.loads(b'"' + raw + b'"')
        except orjson.JSONDecodeError:
            return raw.decode("utf-8", "replace")
        return text if isinstance(text, str) else ""
    return raw.decode("utf-8", "replace")


def _gap(gap: bytes) -> tuple[int, int]:
    """Tokens and shape (`_COLON`, `_OPENS_OBJECT`, `_BRACES`) of the JSON text between two
    string literals."""
    inner = gap.strip(_WS)
    shape = 0
    if inner == b":":
        shape = _COLON
    elif inner[:1] == b":" and inner[1:].strip(_WS) == b"{":
        shape = _OPENS_OBJECT
    if b"{" in gap or b"}" in gap:
        shape |= _BRACES
    return _structure_tokens(gap, ""), shape


def _structure_tokens(gap: bytes, key: str) -> int:
    """Tokens for the JSON text between two string literals: objects, arrays, numbers, literals.
    ``key`` is the key the gap holds the value of, if any."""
    total = gap.count(b"{") * PER_OBJECT + gap.count(b"[") * PER_ARRAY
    numbers = _NUMBER.findall(gap)
    if key in _TOKEN_ARRAY_KEYS:
        total += len(numbers)
    else:
        total += sum(len(_NUMBER_PIECE.findall(number)) + PER_NUMBER for number in numbers)
    return total + len(_LITERAL.findall(gap))


def with_output_cap(body: bytes, field: str, cap: int, *, also_last: bool = False) -> bytes:
    """The body with ``"<field>":<cap>`` added as the first member of its top-level object; every
    other byte is kept as it is. ``body`` must be a JSON object (whitespace around it allowed).

    With ``also_last`` the member is added as the last one too, for a body that has ``field``
    already (as null): whether a parser keeps the first or the last of a repeated key, it reads
    the cap."""
    if cap < 0:
        raise ValueError(f"output cap must not be negative: {cap}")
    start = len(body) - len(body.lstrip(_WS))
    if body[start : start + 1] != b"{":
        raise ValueError("body is not a JSON object")
    member = orjson.dumps(field) + b":" + str(int(cap)).encode()
    rest = body[start + 1 :]
    if rest.lstrip(_WS).startswith(b"}"):
        return body[: start + 1] + member + rest
    capped = body[: start + 1] + member + b"," + rest
    if also_last:
        end = len(capped.rstrip(_WS)) - 1
        if capped[end : end + 1] != b"}":
            raise ValueError("body is not a JSON object")
        capped = capped[:end] + b"," + member + capped[end:]
    return capped
