"""The fields of a form body (``multipart/form-data`` or ``application/x-www-form-urlencoded``), read
as it streams through the proxy, for the checks that need a request's ``model`` and parameters.

The audio endpoints and image edits take their ``model`` as a form field. The parsing is
python-multipart's, the parser Starlette (so FastAPI, vLLM and LiteLLM) reads forms with, and names
are decoded as Starlette decodes them, so the fields checked are the fields such an upstream acts
on. Whatever another parser could read differently (a Content-Type with more than one
``boundary``, a part with two ``Content-Disposition`` fields, two ``name`` parameters, an RFC 2231
``name*``, a backslash in a name, a watched field sent as a file, a body that does not end with its closing boundary)
makes the form unreadable, and the caller refuses it.
Only the values of watched fields are kept, each up to a limit; file contents are never held.
"""

from __future__ import annotations

import contextlib
import re
from typing import Final
from urllib.parse import unquote_plus

from python_multipart.exceptions import FormParserError, MultipartParseError, QuerystringParseError
from python_multipart.multipart import (
    MultipartParser,
    MultipartState,
    QuerystringParser,
    parse_options_header,
)

from llm_proxy.proxy.body_scan import TOO_LARGE

MULTIPART: Final = b"multipart/form-data"
URLENCODED: Final = b"application/x-www-form-urlencoded"

# A `name` parameter, plain or extended (`name*=`), wherever it stands in a Content-Disposition:
# whether it is extended, and its value as written.
_NAME_PARAM: Final = re.compile(
    rb';\s*name\s*(\*?)\s*=\s*("(?:[^"\\]|\\.)*"?|[^;]*)', re.IGNORECASE | re.DOTALL
)
# A `boundary` parameter, plain or extended, wherever it stands in a Content-Type.
_BOUNDARY_PARAM: Final = re.compile(rb";\s*boundary\s*\*?\s*=", re.IGNORECASE)


def form_media_type(content_type: bytes) -> bytes | None:
    """The form media type a Content-Type names, or None when it names no form."""
    media = content_type.partition(b";")[0].strip(b" \t").lower()
    return media if media in (MULTIPART, URLENCODED) else None


class FormInspector:
    """Read a form body chunk by chunk: the values of the watched fields, every occurrence.

    Feed every chunk to `feed()`, then call `finish()`; the body itself goes upstream as received.
    `values` maps each watched name to the decoded values of its fields, `TOO_LARGE` standing for a
    value longer than `max_value_bytes`, not UTF-8, or sent as a file. `well_formed` is false when
    the form cannot be read the way every parser would read it.
    """

    values: dict[str, list[object]]
    well_formed: bool

    def __init__(
        self, watch: frozenset[str], content_type: bytes, *, max_value_bytes: int = 4096
    ) -> None:
        self.values = {name: [] for name in watch}
        self.well_formed = True
        self._watch = {name.encode(): name for name in watch}
        self._limit = max_value_bytes
        # per field (a part, or a name=value pair)
        self._field_name = bytearray()
        self._name_limit = 3 * max((len(name) for name in self._watch), default=0)
        self._watched: str | None = None
        self._value = bytearray()
        self._value_over = False
        # per multipart header
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition: bytes | None = None
        self._dispositions = 0
        self._parser: MultipartParser | QuerystringParser | None = None
        media, options = parse_options_header(content_type)
        if media == MULTIPART and len(_BOUNDARY_PARAM.findall(content_type)) != 1:
            # python-multipart reads the last boundary, aiohttp and the email package the first:
            # each would find the form under its own, and skip the other as preamble or epilogue.
            options = {}
        try:
            if media == MULTIPART:
                self._parser = MultipartParser(
                    options.get(b"boundary", b""),
                    {
                        "on_part_begin": self._part_begin,
                        "on_header_field": self._header_field,
                        "on_header_value": self._header_value_data,
                        "on_header_end": self._header_end,
                        "on_headers_finished": self._headers_finished,
                        "on_part_data": self._value_data,
                        "on_part_end": self._field_end,
                    },
                )
            elif media == URLENCODED:
                self._parser = QuerystringParser(
                    {
                        "on_field_start": self._field_start,
                        "on_field_name": self._name_data,
                        "on_field_data": self._urlencoded_value_data,
                        "on_field_end": self._urlencoded_field_end,
                    }
                )
        except FormParserError:
            pass
        if self._parser is None or (media == MULTIPART and not options.get(b"boundary")):
            self._parser = None
            self.well_formed = False

    def feed(self, chunk: bytes) -> None:
        if self._parser is None or not chunk:
            return
        try:
            self._parser.write(chunk)
        except (MultipartParseError, QuerystringParseError, FormParserError):
            self._fail()

    def finish(self) -> None:
        parser = self._parser
        if parser is None:
            return
        if isinstance(parser, MultipartParser) and parser.state != MultipartState.END:
            # python-multipart leaves this check to its caller: a body cut before the closing
            # boundary could end a part where another parser goes on reading it.
            self._fail()
            return
        parser.finalize()

    def _fail(self) -> None:
        self.well_formed = False
        self._parser = None

    # name=value pairs

    def _field_start(self) -> None:
        self._field_name.clear()
        self._watched = None
        self._value.clear()
        self._value_over = False

    def _name_data(self, data: bytes, start: int, end: int) -> None:
        if len(self._field_name) <= self._name_limit:
            self._field_name += data[start:end]

    def _urlencoded_value_data(self, data: bytes, start: int, end: int) -> None:
        if self._watched is None and self._field_name:
            self._watched = self._urlencoded_name()
            self._field_name.clear()
        self._value_data(data, start, end)

    def _urlencoded_name(self) -> str | None:
        if len(self._field_name) > self._name_limit:
            return None
        # As Starlette decodes a field name, percent-escapes and '+' included.
        name = unquote_plus(self._field_name.decode("latin-1"))
        return name if name.encode() in self._watch else None

    def _urlencoded_field_end(self) -> None:
        if self._watched is None and self._field_name:
            # A name with no '=' (or an empty value): a field all the same, its value empty.
            self._watched = self._urlencoded_name()
        if self._watched is not None:
            text = unquote_plus(bytes(self._value).decode("latin-1"))
            self._value.clear()
            self.values[self._watched].append(TOO_LARGE if self._value_over else text)
        self._watched = None

    # multipart parts

    def _part_begin(self) -> None:
        self._disposition = None
        self._dispositions = 0
        self._watched = None
        self._value.clear()
        self._value_over = False
        self._header_name.clear()
        self._header_value.clear()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._dispositions += 1
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        disposition = self._disposition
        params = _NAME_PARAM.findall(disposition) if disposition is not None else []
        # A backslash in the name: python-multipart keeps it unless it escapes a quote, aiohttp
        # drops it before any character ("mod\el" is "model" there).
        if self._dispositions != 1 or [(star, b"\\" in value) for star, value in params] != [
            (b"", False)
        ]:
            raise MultipartParseError("a part whose name parsers could read differently")
        _, options = parse_options_header(disposition)
        name = options.get(b"name")
        if name is None or name not in self._watch:
            return
        self._watched = self._watch[name]
        if b"filename" in options:
            self.values[self._watched].append(TOO_LARGE)  # a file is no value to check
            self._watched = None

    # either

    def _value_data(self, data: bytes, start: int, end: int) -> None:
        if self._watched is None or self._value_over:
            return
        self._value += data[start:end]
        if len(self._value) > self._limit:
            self._value_over = True
            self._value.clear()

    def _field_end(self) -> None:
        if self._watched is None:
            return
        value: object = TOO_LARGE
        if not self._value_over:
            with contextlib.suppress(UnicodeDecodeError):
                value = self._value.decode()
        self._value.clear()
        self.values[self._watched].append(value)
        self._watched = None
