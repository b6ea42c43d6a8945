"""The ``model`` of a multipart request (audio transcriptions and translations, image edits), read
from its captured body for the event.

The request path reads a form only when a token's checks need its model, and the exchange carries
no request header; a multipart body names its boundary on its first line, so the event reads the
form from the capture alone, with the parser (and the reading rules) of the request path's checks.
"""

from __future__ import annotations

from typing import Final

from llm_proxy.proxy.form_scan import FormInspector

# RFC 2046 §5.1.1: a boundary is 1 to 70 characters, none of them a quote or a backslash.
_MAX_BOUNDARY: Final = 70
_MODEL: Final = frozenset({"model"})


def multipart_model(body: bytes) -> str | None:
    """The one ``model`` field of a multipart body (or of its captured head), else None."""
    if not body.startswith(b"--"):
        return None
    line_end = body.find(b"\r\n", 2, 2 + _MAX_BOUNDARY + 2)
    boundary = body[2:line_end].rstrip(b" \t") if line_end > 2 else b""
    if not boundary or b'"' in boundary or b"\\" in boundary:
        return None
    inspector = FormInspector(_MODEL, b'multipart/form-data; boundary="' + boundary + b'"')
    inspector.feed(body)
    inspector.finish()  # a capture cut short keeps the fields read before the cut
    values = inspector.values["model"]
    if len(values) != 1 or not isinstance(values[0], str) or not values[0]:
        return None  # none, several (parsers could pick either), a file, or too long
    return values[0]
