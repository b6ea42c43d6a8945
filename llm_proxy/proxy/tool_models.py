"""Models a request runs besides its own ``model``: those of the hosted tools that run one.

The Responses API's ``image_generation`` tool runs an image model of its own, named by the tool's
``model`` (the upstream picks one when it names none), so a token limited to some models must
allow that one too; and it is billed per image, apart from the response's usage, which
``prices.yaml`` cannot price, so a budgeted token cannot use it. The ``tools`` value is read with
every member of every object, as a repeated key may be read either way upstream.
"""

from __future__ import annotations

from typing import Final

from llm_proxy.json_keys import Members, with_every_member

# Tool types whose tool runs a model of its own, named by its "model" member.
MODEL_TOOL_TYPES: Final = frozenset({"image_generation"})
_MARKS: Final = (*(name.encode() for name in MODEL_TOOL_TYPES), b"\\u")


class UnreadableTools(ValueError):
    """The ``tools`` value is not JSON."""


def tool_models(tools: bytes) -> list[object]:
    """The models named by the tools in ``tools`` (its JSON text) that run one, with None for such
    a tool that names none."""
    if not any(tools.find(mark) >= 0 for mark in _MARKS):
        return []  # (no tool type can be spelled, escaped or not)
    try:
        parsed = with_every_member(tools)
    except ValueError:
        raise UnreadableTools from None
    models: list[object] = []
    for tool in parsed if isinstance(parsed, list) else [parsed]:
        if not isinstance(tool, Members):
            continue
        if not any(
            key == "type" and isinstance(value, str) and value in MODEL_TOOL_TYPES
            for key, value in tool
        ):
            continue
        named = [value for key, value in tool if key == "model"]
        models += named or [None]
    return models
