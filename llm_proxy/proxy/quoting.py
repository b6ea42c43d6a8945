"""How a refusal names a value the client sent (a model, in the body or the path)."""

from __future__ import annotations

from llm_proxy.crypto import redact

# The most of a client's value a message repeats: enough to recognise it.
_QUOTED_LENGTH = 100


def quoted(value: object) -> str:
    """``value`` quoted for an error message: a string cut short with anything secret-shaped in
    it masked (a client may paste a token where a model goes, and SPEC §6 keeps tokens out of
    every message), any other JSON value by its type's name."""
    if not isinstance(value, str):
        return repr(type(value).__name__)
    return repr(redact(value[:_QUOTED_LENGTH]))
