"""Reading form posts: the same field checks and messages as the JSON API, for text inputs."""

from __future__ import annotations

import re

from aiohttp import web

from llm_proxy.control import validation
from llm_proxy.control.validation import MISSING
from llm_proxy.errors import InvalidBody, InvalidField

Form = dict[str, str]


async def read_form(request: web.Request) -> Form:
    """The posted fields; file uploads are ignored (no admin form has one)."""
    try:
        posted = await request.post()
    except (ValueError, LookupError, RuntimeError):
        # aiohttp's reading of a body no browser sends: bytes that are not UTF-8
        # (UnicodeDecodeError), an unknown charset (LookupError), multipart without a boundary,
        # a part in an unknown Content-Transfer-Encoding (RuntimeError).
        raise InvalidBody(
            "The form could not be read: it is not URL-encoded or multipart UTF-8 text. "
            "Nothing was changed."
        ) from None
    return {key: value for key, value in posted.items() if isinstance(value, str)}


def name(form: Form, *, required: bool) -> str:
    value = validation.name(form, required=required)
    return "" if value is MISSING else str(value)


def description(form: Form) -> str:
    # A text area's value, as its maxlength counts it and as the API takes it, breaks lines with
    # LF; browsers send each break as CRLF, so a description the box accepted was refused as too
    # long, and the ones stored held CR LF.
    typed = form.get("description")
    if typed is not None:
        form = {**form, "description": typed.replace("\r\n", "\n")}
    value = validation.description(form)
    return "" if value is MISSING else str(value)


def upstream_key(form: Form, *, required: bool) -> str:
    value = validation.upstream_key(form, required=required)
    return "" if value is MISSING else str(value)


def number(form: Form, key: str, *, minimum: int, maximum: int, required: bool) -> int | None:
    """A whole number typed into a text box; blank means None unless required."""
    raw = form.get(key, "").strip().replace("_", "").replace(",", "")
    if not raw:
        if required:
            raise InvalidField(key, "is required")
        return None
    # ASCII digits and one sign at most: str.isdigit() also takes "²", and int() refuses it
    # and "--5".
    if re.fullmatch(r"-?[0-9]+", raw) is None:
        raise InvalidField(key, "must be a whole number")
    if len(raw) > 50:  # int() of a huge digit string is slow; no bound here is that long
        raise InvalidField(key, f"must be between {minimum} and {maximum}")
    value: int | None = validation.integer(
        {key: int(raw)}, key, minimum=minimum, maximum=maximum, required=required
    )
    return value
