"""Single-pass inspection of a JSON request body as it streams through the proxy in chunks.

`BodyInspector` reads the decoded values of chosen top-level keys and, for a streamed completion,
splices `"include_usage":true` into the body, while every other byte goes upstream as received.
The body is never held whole: the scanner keeps a container stack, a few flags and small
bounded buffers (a pending key, a watched value, a partial escape or scalar token, and the
bytes held back for an injection).

Regexes jump from one significant character to the next (outside strings `"{}[],:`, inside
strings a quote or a backslash), so the Python loop runs once per token, not once per byte.
"""

from __future__ import annotations

import re
from typing import Final

import orjson

from llm_proxy.json_keys import Members, with_every_member

TOO_LARGE: Final = object()
"""Stands in `BodyInspector.values` for a watched value whose raw JSON text was too long."""

OPTIONS_HOLD_LIMIT: Final = 64 * 1024
"""Longest `stream_options` object (or text after the closing brace) held back to inject into."""

MAX_DEPTH: Final = 1024
"""Deepest nesting accepted; orjson and Python's json refuse deeper bodies anyway."""

MAX_SCALAR_BYTES: Final = 4096
"""Longest number accepted; Python's json refuses longer integers, so no upstream wants one."""

_STRING_BODY: Final = rb'[^"\\\x00-\x1f]*+(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*+)*+'
# Groups: 1 the text before the next significant character, then either 2 the body of a string
# with 3 its closing quote (absent when the string runs past the chunk or stops at a bad byte),
# or 4 a structural character.
_TOKEN: Final = re.compile(rb'([^"{}\[\],:]*+)(?:"(' + _STRING_BODY + rb')(")?|([{}\[\],:]))')
_ESCAPE: Final = re.compile(rb'\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})')
# Every byte that can end the body of a string (a quote, a backslash, a control character) mapped to
# a quote: one C-speed translate and find per window instead of the regex engine's byte loop, which
# ran at ~140 MB/s over the base64 image of a vision request (5-6 times slower than this).
_STRING_STOPS: Final = bytes.maketrans(bytes(range(0x20)) + b"\\", b'"' * 0x21)
_FIRST_WINDOW: Final = 1024
_LARGEST_WINDOW: Final = 256 * 1024


def _string_body_end(chunk: bytes, pos: int) -> int:
    """Where the body of a string that goes on at ``pos`` stops: the end of ``_STRING_BODY``'s
    match there, at the speed of ``bytes.translate``. Windows grow from small, so a short string
    costs little, and no byte is translated twice."""
    size = len(chunk)
    window = _FIRST_WINDOW
    while pos < size:
        base, limit = pos, min(size, pos + window)
        stops = chunk[base:limit].translate(_STRING_STOPS)
        while pos < limit:
            at = stops.find(b'"', pos - base)
            if at < 0:
                break
            stop = base + at
            if chunk[stop] != _BACKSLASH:
                return stop  # the closing quote, or a control character
            escape = _ESCAPE.match(chunk, stop)
            if escape is None:
                return stop  # not an escape, or one the chunk cuts
            pos = escape.end()
        pos = max(pos, limit)
        window = min(window * 8, _LARGEST_WINDOW)
    return size


_PARTIAL_ESCAPE: Final = re.compile(rb"\\(?:u[0-9a-fA-F]{0,3})?")
_SCALAR: Final = re.compile(
    rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null"
)
_WS: Final = b" \t\r\n"

_QUOTE: Final = ord('"')
_BACKSLASH: Final = ord("\\")
_LBRACE: Final = ord("{")
_RBRACE: Final = ord("}")
_LBRACKET: Final = ord("[")
_COMMA: Final = ord(",")
_COLON: Final = ord(":")

# Parser states: what may come next outside strings.
_VALUE: Final = 0  # a value (at the start, after ':' or after ',' in an array)
_VALUE_OR_END: Final = 1  # just after '['
_KEY: Final = 2  # after ',' in an object
_KEY_OR_END: Final = 3  # just after '{'
_AFTER_KEY: Final = 4  # a key ended: ':'
_AFTER_VALUE: Final = 5  # a value ended inside a container: ',' or the closer
_DONE: Final = 6  # the top-level value ended: whitespace only
_BROKEN: Final = 7  # not JSON: pass everything through untouched

# What a top-level key means for the value that follows it.
_WATCHED: Final = 1
_STREAM: Final = 2
_OPTIONS: Final = 4

_HOLD_NONE: Final = 0
_HOLD_OPTIONS: Final = 1  # from the '{' of a top-level stream_options value to its '}'
_HOLD_TAIL: Final = 2  # from the top-level object's closing '}' to the end of the body
_HOLD_OPTIONS_VALUE: Final = 3  # from the ':' after a top-level stream_options key to its value
_HOLD_AFTER_NULL: Final = 4  # from that ':' while its value null waits for a "stream" true

_TAIL_INSERT: Final = b',"stream_options":{"include_usage":true}'
OPTIONS_FOR_NULL: Final = b'{"include_usage":true}'
"""What a top-level ``stream_options`` null becomes in a body that streams."""
_NULL: Final = b"null"
_USAGE_KEY: Final = b"include_usage"


_USAGE_NULL: Final = re.compile(rb'("include_usage"\s*:\s*)null')


def _usage_nulls_set(options: bytes) -> bytes | None:
    """A ``stream_options`` object's text whose every ``include_usage`` is null (the API's default,
    as if absent) with each set to true; None when any is not null, or the text is not plain
    enough to tell by a search: an escape, a nested object, the name spelled as a value."""
    if options.find(b"\\") >= 0 or options.count(b"{") != 1:
        return None
    nulls_set, count = _USAGE_NULL.subn(rb"\1true", options)
    return nulls_set if count and count == options.count(b'"include_usage"') else None


class _Capture:
    """Raw text of a token that may straddle chunks, kept only up to a limit."""

    __slots__ = ("active", "buf", "limit", "over", "start")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = False
        self.start = 0
        self.buf = bytearray()
        self.over = False

    def begin(self, at: int) -> None:
        self.active = True
        self.start = at
        self.over = False

    def carry(self, chunk: bytes) -> None:
        """The chunk ended mid-token: keep its part, unless the token is already too long."""
        if not self.over:
            self.buf += chunk[self.start :]
            if len(self.buf) > self.limit:
                self.over = True
                self.buf.clear()
        self.start = 0

    def take(self, chunk: bytes, end: int) -> bytes | None:
        """The token ends before `end`: its whole text, or None when longer than the limit."""
        self.active = False
        if self.over or len(self.buf) + end - self.start > self.limit:
            self.buf.clear()
            return None
        text = bytes(self.buf) + chunk[self.start : end] if self.buf else chunk[self.start : end]
        self.buf.clear()
        return text


class BodyInspector:
    """Scan a JSON body chunk by chunk: watched top-level values, well-formedness, usage injection.

    Feed every chunk to `feed()` and forward what it returns, then call `finish()` and forward
    that too. Without an injection the forwarded bytes equal the input exactly. With
    `inject_usage`, a well-formed object whose last top-level `"stream"` is `true` is made to
    ask for usage: `,"stream_options":{"include_usage":true}` goes before the final `}` when
    there is no top-level `stream_options`, or `"include_usage":true` goes first inside a
    `stream_options` object that lacks it, or a `stream_options` that is `null` (the OpenAI API's
    default, as if absent) is replaced by `{"include_usage":true}`, and an `include_usage` that is
    null is set to true. Client-set `include_usage`,
    a `stream_options` that is neither an object nor null, or one longer than
    `OPTIONS_HOLD_LIMIT` means no injection.

    A null is held back from its ``:`` until a ``"stream"`` shows, up to `OPTIONS_HOLD_LIMIT`.
    A caller that can hold more (on disk: a client may send ``"stream": true`` after megabytes
    of images) asks ``defer_null``: a null that outgrows the limit then goes out unchanged at
    `null_at` in the output while `null_pending`, the caller holding the output from there on;
    once decided, `null_replaced` tells whether its four bytes are to be sent as
    `OPTIONS_FOR_NULL` instead (see `replace_deferred_null`); `modified` and `usage_injected`
    then count that replacement as made. A caller that cannot hold a body (nor the rest of it
    past a null) leaves ``defer_null`` off: such a null goes unchanged and nothing is injected.

    The insertion into `stream_options` goes out when that object closes, before the rest of
    the body is seen, so it can also reach a body that later turns out not to stream or not to
    be JSON; `modified` tells whether the output differs from the input.

    Results are readable at any time for what has been seen so far and final after `finish()`.
    `well_formed` stays true until a flaw is seen; `finish()` also requires a complete value.
    A watched value that orjson cannot decode (invalid UTF-8, a lone surrogate, a float
    overflowing to infinity) makes the body not well-formed, since the caller could not check it.
    The values of the names in ``raw`` are kept as their JSON text instead, up to
    ``max_raw_bytes``, for a caller that must see every member of a repeated key inside them.
    """

    values: dict[str, list[object]]
    is_object: bool
    well_formed: bool
    stream: bool
    usage_injected: bool
    modified: bool
    null_at: int
    null_pending: bool
    null_replaced: bool

    def __init__(
        self,
        watch: frozenset[str] = frozenset(),
        *,
        inject_usage: bool = False,
        max_value_bytes: int = 4096,
        raw: frozenset[str] = frozenset(),
        max_raw_bytes: int = 1 << 20,
        defer_null: bool = False,
    ) -> None:
        watch |= raw
        # results
        self.values = {name: [] for name in watch}
        self.is_object = False
        self.well_formed = True
        self.stream = False
        self.usage_injected = False
        self.modified = False
        self.null_at = -1
        self.null_pending = False
        self.null_replaced = False
        # configuration: raw (unescaped) top-level key -> what its value means
        self._inject = inject_usage
        self._roles: dict[bytes, int] = {name.encode(): _WATCHED for name in watch}
        self._roles[b"stream"] = self._roles.get(b"stream", 0) | _STREAM
        if inject_usage:
            self._roles[b"stream_options"] = self._roles.get(b"stream_options", 0) | _OPTIONS
        longest = max(len(key) for key in (*self._roles, _USAGE_KEY))
        # parser
        self._state = _VALUE
        self._stack = bytearray()
        self._in_string = False
        self._string_is_key = False
        self._string_is_watched = False  # the string is a watched top-level value
        self._escape = b""  # a backslash escape cut by the chunk's end
        self._gap = b""  # text outside strings cut by the chunk's end, whitespace collapsed
        self._role = 0  # roles of the top-level key whose value comes next
        self._role_name = ""
        self._raw = raw
        self._value_limit = max_value_bytes
        self._raw_limit = max_raw_bytes
        # captures: an escaped key is at most six bytes per byte of its decoded UTF-8
        self._key = _Capture(6 * longest)
        self._value = _Capture(max_value_bytes)
        # injection
        self._options_seen = False
        self._options_has_keys = False
        self._options_has_usage = False
        self._options_inserted = False
        self._options_null = False  # the value held from a stream_options key's ':' is null
        self._no_injection = False  # some stream_options rules injection out
        self._defer_null = defer_null
        # output of the chunk being scanned
        self._chunk = b""
        self._out: list[bytes] = []
        self._emit = 0  # first byte of the chunk not yet output or held
        self._hold: bytearray | None = None
        self._hold_kind = _HOLD_NONE
        self._hold_start = 0
        self._given = 0  # bytes output by feed() and finish() so far

    @property
    def injects_usage(self) -> bool:
        """Whether it was made to ask a stream's usage (a chat or legacy completion)."""
        return self._inject

    def feed(self, chunk: bytes) -> bytes:
        """Take the next chunk; return the bytes that may go upstream now (possibly b"")."""
        if self._state == _BROKEN:
            self._given += len(chunk)
            return chunk
        if not chunk:
            return b""
        self._chunk = chunk
        self._out = []
        self._emit = 0
        pos = self._resume_string() if self._in_string else 0
        if pos >= 0:
            self._scan(pos)
        return self._end_chunk()

    def finish(self) -> bytes:
        """The body ended: return the bytes still held back (with the injection, if any)."""
        self._chunk = b""
        self._out = []
        self._emit = 0
        if self._state != _BROKEN:
            # A scalar cut by the end still counts, so the gap goes first.
            ended = not self._in_string and (not self._gap or self._gap_ok(b""))
            if not ended or self._state != _DONE:
                self._break()
        tail = self._end_chunk()
        if self._state == _BROKEN:
            return tail
        if self._hold_kind == _HOLD_TAIL and self._hold is not None:
            self.usage_injected = self.modified = True
            # (Past any null_at: a body without stream_options holds no null to defer.)
            tail += _TAIL_INSERT + bytes(self._hold)
            self._hold = None
        elif self._options_inserted and not self._no_injection:
            self.usage_injected = self.stream
        return tail

    def replace_deferred_null(self, out: bytes) -> bytes:
        """The whole output ``out`` with a deferred null replaced, when it is to be."""
        if not self.null_replaced:
            return out
        at = self.null_at
        return out[:at] + OPTIONS_FOR_NULL + out[at + len(_NULL) :]

    # scanning

    def _scan(self, pos: int) -> None:
        chunk = self._chunk
        size = len(chunk)
        match = _TOKEN.match
        while pos < size:
            found = match(chunk, pos)
            if found is None:
                self._carry_gap(chunk[pos:])
                return
            at = found.end(1)
            if (at > pos or self._gap) and not self._gap_ok(chunk[pos:at]):
                self._break()
                return
            kind = found.lastindex
            if kind == 4:
                if not self._structural(chunk[at], at):
                    self._break()
                    return
                pos = at + 1
                continue
            end = found.end()
            if not self._string_opened(at):
                self._break()
                return
            if kind == 3:
                self._string_closed(end - 1)
                if self._state == _BROKEN:
                    return
                pos = end
            else:
                self._string_cut(end)
                return

    def _resume_string(self) -> int:
        """Go on with a string left open by the last chunk; where the scan resumes, or -1."""
        chunk = self._chunk
        pos = 0
        if self._escape:
            text = self._escape + chunk[:6]
            escape = _ESCAPE.match(text)
            if escape is None:
                if _PARTIAL_ESCAPE.fullmatch(text):
                    self._escape = text
                else:
                    self._break()
                return -1
            pos = escape.end() - len(self._escape)
            self._escape = b""
        end = _string_body_end(chunk, pos)
        if end < len(chunk) and chunk[end] == _QUOTE:
            self._in_string = False
            self._string_closed(end)
            return -1 if self._state == _BROKEN else end + 1
        self._string_cut(end)
        return -1

    def _string_cut(self, end: int) -> None:
        """A string stopped before its closing quote: the chunk ended, or a bad byte came."""
        chunk = self._chunk
        if end == len(chunk) or (
            chunk[end] == _BACKSLASH and _PARTIAL_ESCAPE.fullmatch(chunk, end)
        ):
            self._in_string = True
            self._escape = chunk[end:]
        else:
            self._break()

    def _string_opened(self, at: int) -> bool:
        state = self._state
        depth = len(self._stack)
        if state in (_KEY, _KEY_OR_END):
            self._string_is_key = True
            if depth == 1 or (depth == 2 and self._hold_kind == _HOLD_OPTIONS):
                self._key.begin(at + 1)
            return True
        if state > _VALUE_OR_END:
            return False
        self._string_is_key = False
        self._string_is_watched = bool(self._role & _WATCHED)
        if self._role:
            self._scalar_or_string_role(None)
            if self._string_is_watched:
                self._begin_value(at)
            self._role = 0
            if self._hold_kind == _HOLD_OPTIONS_VALUE:
                self._let_go(at)
        return True

    def _string_closed(self, at: int) -> None:
        if self._string_is_key:
            self._state = _AFTER_KEY
            if self._key.active:
                self._key_done(self._key.take(self._chunk, at))
            return
        self._state = _AFTER_VALUE if self._stack else _DONE
        if self._string_is_watched:
            self._value_done(self._value.take(self._chunk, at + 1))

    def _key_done(self, raw: bytes | None) -> None:
        if raw is None:
            return
        if _BACKSLASH in raw:
            try:
                raw = orjson.loads(b'"' + raw + b'"').encode()
            except orjson.JSONDecodeError:
                return
        if len(self._stack) == 2:
            self._options_has_keys = True
            if raw == _USAGE_KEY:
                self._options_has_usage = True
            return
        role = self._roles.get(raw, 0)
        if role:
            self._role = role
            self._role_name = raw.decode()
            if role & _OPTIONS:
                self._options_seen = True
                if self._hold_kind == _HOLD_AFTER_NULL:
                    # Repeated: which one an upstream keeps is its own choice; ask nothing.
                    self._give_up()
                elif self.null_pending:
                    self._null_decided(replace=False)

    def _begin_value(self, at: int) -> None:
        capture = self._value
        capture.limit = self._raw_limit if self._role_name in self._raw else self._value_limit
        capture.begin(at)

    def _value_done(self, raw: bytes | None) -> None:
        if raw is None:
            self.values[self._role_name].append(TOO_LARGE)
            return
        if self._role_name in self._raw:
            self.values[self._role_name].append(raw)
            return
        try:
            self.values[self._role_name].append(orjson.loads(raw))
        except orjson.JSONDecodeError:
            self._break()

    def _scalar_or_string_role(self, token: bytes | None) -> None:
        """Effects of a top-level key's scalar (or string, when None) value beyond watching."""
        if self._role & _STREAM:
            self.stream = token == b"true"
        if self._role & _OPTIONS:
            if token == _NULL and self._hold_kind == _HOLD_OPTIONS_VALUE:
                self._options_null = True
            else:
                self._no_injection = True

    def _gap_ok(self, text: bytes) -> bool:
        """Account for the text before a significant character: whitespace or one scalar."""
        if self._gap:
            text = self._gap + text
            self._gap = b""
        token = text.strip(_WS)
        if not token:
            return True
        state = self._state
        if state > _VALUE_OR_END or len(token) > MAX_SCALAR_BYTES or not _SCALAR.fullmatch(token):
            return False
        if not self._stack:
            self._state = _DONE
            return True
        self._state = _AFTER_VALUE
        if self._role:
            self._scalar_or_string_role(token)
            if self._role & _WATCHED:
                self._value_done(token if len(token) <= self._value.limit else None)
            self._role = 0
        return self._state != _BROKEN

    def _carry_gap(self, text: bytes) -> None:
        text = (self._gap + text).lstrip(_WS)
        token = text.rstrip(_WS)
        if len(token) < len(text):
            # A token cannot contain whitespace: a mark is enough to reject one continuing.
            token += b" "
        if len(token) > MAX_SCALAR_BYTES + 1:
            self._break()
        else:
            self._gap = token

    def _structural(self, char: int, at: int) -> bool:
        state = self._state
        stack = self._stack
        if char == _COMMA:
            if state != _AFTER_VALUE:
                return False
            self._state = _KEY if stack[-1] == _LBRACE else _VALUE
            if len(stack) == 1:
                if self._hold_kind >= _HOLD_OPTIONS_VALUE:
                    self._settle_null(at, final=False)
                elif self.null_pending and self.stream:
                    self._null_decided(replace=True)
        elif char == _COLON:
            if state != _AFTER_KEY:
                return False
            self._state = _VALUE
            if self._role & _OPTIONS and not self._no_injection and self._hold is None:
                # Held until the value shows: a null is replaced, so its bytes must not go yet.
                self._options_null = False
                self._begin_hold(_HOLD_OPTIONS_VALUE, at + 1)
        elif char in (_LBRACE, _LBRACKET):
            if state > _VALUE_OR_END or len(stack) >= MAX_DEPTH:
                return False
            if not stack:
                self.is_object = char == _LBRACE
            elif self._role:
                self._container_opened(char, at)
            stack.append(char)
            self._state = _KEY_OR_END if char == _LBRACE else _VALUE_OR_END
        else:
            opener = _LBRACE if char == _RBRACE else _LBRACKET
            empty = _KEY_OR_END if char == _RBRACE else _VALUE_OR_END
            if not stack or stack[-1] != opener or (state != _AFTER_VALUE and state != empty):
                return False
            stack.pop()
            if len(stack) > 1:
                self._state = _AFTER_VALUE
            elif stack:
                self._state = _AFTER_VALUE
                self._container_closed(at)
            else:
                self._state = _DONE
                if self._hold_kind >= _HOLD_OPTIONS_VALUE:
                    self._settle_null(at, final=True)
                elif self.null_pending:
                    self._null_decided(replace=self.stream)
                if self._inject and self.stream and not self._options_seen:
                    self._begin_hold(_HOLD_TAIL, at)
        return self._state != _BROKEN

    def _container_opened(self, char: int, at: int) -> None:
        """The value of a top-level key opens."""
        role = self._role
        self._role = 0
        if self._hold_kind == _HOLD_OPTIONS_VALUE:
            self._let_go(at)
        if role & _WATCHED:
            self._begin_value(at)
        if role & _STREAM:
            self.stream = False
        if role & _OPTIONS:
            if char != _LBRACE:
                self._no_injection = True
            elif not self._no_injection:
                self._options_has_keys = self._options_has_usage = False
                self._begin_hold(_HOLD_OPTIONS, at)

    def _container_closed(self, at: int) -> None:
        """A container directly inside the top-level one closes: end its capture or hold."""
        if self._value.active:
            self._value_done(self._value.take(self._chunk, at + 1))
        if self._hold_kind != _HOLD_OPTIONS or self._hold is None:
            return
        text = bytes(self._hold) + self._chunk[self._hold_start : at + 1]
        self._hold = None
        self._hold_kind = _HOLD_NONE
        self._emit = at + 1
        if self._options_has_usage or len(text) > OPTIONS_HOLD_LIMIT:
            nulls_set = _usage_nulls_set(text) if len(text) <= OPTIONS_HOLD_LIMIT else None
            if nulls_set is None:
                self._no_injection = True
                self._out.append(text)
                return
            self._out.append(nulls_set)
            self._options_inserted = self.modified = True
            return
        insert = b'"include_usage":true,' if self._options_has_keys else b'"include_usage":true'
        self._out.append(text[:1] + insert + text[1:])
        self._options_inserted = self.modified = True

    def _settle_null(self, at: int, *, final: bool) -> None:
        """A top-level member ends at ``at`` while a stream_options value is held: let a value
        other than null go; replace a null once the body streams, else go on holding it until it
        does or the body ends."""
        held = self._hold
        size = (len(held) if held is not None else 0) + at - self._hold_start
        # (The limit also bounds a hold that grew inside one chunk: the same in any chunking.)
        waits = self._options_null and size <= OPTIONS_HOLD_LIMIT
        if waits and not self.stream and not final:
            self._hold_kind = _HOLD_AFTER_NULL
            return
        text = (bytes(held) if held else b"") + self._chunk[self._hold_start : at]
        if waits and self.stream:
            # The hold began right after the ':', so the null is its first token.
            start = len(text) - len(text.lstrip(_WS))
            text = text[:start] + OPTIONS_FOR_NULL + text[start + len(_NULL) :]
            self._options_inserted = self.modified = True
        elif self._hold_kind == _HOLD_AFTER_NULL and size > OPTIONS_HOLD_LIMIT:
            self._defer(text, at)
            if self.null_pending and (self.stream or final):
                self._null_decided(replace=self.stream)
            return
        elif self._options_null and size > OPTIONS_HOLD_LIMIT:
            # (Padded past the limit before its member ended: seen as null in no other chunking.)
            self._no_injection = True
        self._let_go(at, text)

    def _defer(self, text: bytes, at: int | None = None) -> None:
        """A held null outgrew the hold: let ``text``, what was held (up to ``at`` in the chunk,
        else to its end), go unchanged, the null left to the caller to replace when asked to
        hold it (once: a second would need a second place held), else given up."""
        if not self._defer_null or self.null_at >= 0:
            self._no_injection = True
        else:
            start = len(text) - len(text.lstrip(_WS))
            self.null_at = self._given + sum(map(len, self._out)) + start
            self.null_pending = True
        if at is None:
            self._out.append(text)
            self._hold = None
            self._hold_kind = _HOLD_NONE
        else:
            self._let_go(at, text)

    def _null_decided(self, *, replace: bool) -> None:
        self.null_pending = False
        self.null_replaced = replace
        if replace:
            self._options_inserted = self.modified = True
        else:
            self._no_injection = True

    # output

    def _begin_hold(self, kind: int, at: int) -> None:
        self._out.append(self._chunk[self._emit : at])
        self._hold = bytearray()
        self._hold_kind = kind
        self._hold_start = at

    def _end_chunk(self) -> bytes:
        chunk = self._chunk
        if self._key.active:
            self._key.carry(chunk)
        if self._value.active:
            self._value.carry(chunk)
        hold = self._hold
        if hold is None:
            self._out.append(chunk[self._emit :])
        else:
            hold += chunk[self._hold_start :]
            self._hold_start = 0
            if len(hold) > OPTIONS_HOLD_LIMIT:
                if self._hold_kind == _HOLD_AFTER_NULL:
                    self._defer(bytes(hold))
                else:
                    self._release()
        out = self._out
        self._out = []
        self._chunk = b""
        given = out[0] if len(out) == 1 else b"".join(out)
        self._given += len(given)
        return given

    def _let_go(self, at: int, text: bytes | None = None) -> None:
        """End a hold at ``at``: what it held goes out as ``text``, or unchanged."""
        if text is None:
            held = self._hold
            text = (bytes(held) if held else b"") + self._chunk[self._hold_start : at]
        self._out.append(text)
        self._hold = None
        self._hold_kind = _HOLD_NONE
        self._emit = at

    def _give_up(self) -> None:
        """Stop injecting mid-chunk: what was held goes out unchanged."""
        self._emit = self._hold_start
        self._release()

    def _release(self) -> None:
        """Give up injecting: what was held goes out unchanged."""
        if self._hold is not None:
            self._out.append(bytes(self._hold))
            self._hold = None
        self._hold_kind = _HOLD_NONE
        self._no_injection = True

    def _break(self) -> None:
        """The body is not JSON: stop scanning and pass everything through from here on."""
        self.well_formed = False
        self._state = _BROKEN
        self._in_string = False
        self._key.active = self._value.active = False
        if self._hold is not None:
            self._emit = self._hold_start
        self._release()
        if self.null_pending:
            self._null_decided(replace=False)


_INCLUDE_USAGE = b',"stream_options":{"include_usage":true}'
_NULL_OPTIONS = re.compile(rb'("stream_options"\s*:\s*)null')
_ABSENT = object()


def ask_usage(body: bytes) -> bytes | None:
    """A whole (small) body rewritten to ask for stream usage, or None when it stays as it is.

    The common cases are decided by orjson, far cheaper than a :class:`BodyInspector` pass on a
    small body: a body that cannot hold a ``"stream"`` key (none spelled out, no ``\\u`` escape
    that could spell one) is left at once, ``stream_options`` absent means one splice before
    the closing brace, and ``stream_options`` null (the API's default, as absent) one replacement.
    Only a client's own ``stream_options`` needs the inspector.
    """
    # find(), not ``in``: bytes.__contains__ first tries its operand as an int, raising and
    # clearing a TypeError on every call, which costs more than the search of a small body.
    if body.find(b'"stream"') < 0 and body.find(b"\\u") < 0:
        return None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict) or parsed.get("stream") is not True:
        return None
    options = parsed.get("stream_options", _ABSENT)
    if options is _ABSENT:
        end = body.rindex(b"}")
        return body[:end] + _INCLUDE_USAGE + body[end:]
    if options is None and b"\\u" not in body and body.count(b'"stream_options"') == 1:
        # Spelled once and no escapes: that one is the top-level key, whose value is null.
        return _NULL_OPTIONS.sub(rb"\1" + OPTIONS_FOR_NULL, body, count=1)
    if (
        isinstance(options, dict)
        and options.get("include_usage") is not None
        and b"\\u" not in body
        and body.count(b'"stream_options"') == 1
        and body.count(b'"include_usage"') == 1
    ):
        # The client decided (an SDK asking for usage, the usual streamed request): nothing to
        # write. Each key spelled once and no escapes, so no duplicate could read otherwise
        # upstream. The inspector costs ~15 µs here hot and ~200 µs on a cold cache, between
        # the streams of a quiet proxy, before the request could leave.
        return None
    inspector = BodyInspector(inject_usage=True)
    rewritten = inspector.feed(body) + inspector.finish()
    return rewritten if inspector.usage_injected else None


def asks_usage_in_any_reading(options: object) -> bool:
    """Whether a ``stream_options`` value (its JSON text) asks for usage whichever of a repeated
    ``include_usage`` a parser keeps."""
    if not isinstance(options, bytes):
        return False
    try:
        members = with_every_member(options)
    except ValueError:
        return False
    if not isinstance(members, Members):  # (an array, a string: no options at all)
        return False
    asked = [value for key, value in members if key == "include_usage"]
    return bool(asked) and all(value is True for value in asked)
