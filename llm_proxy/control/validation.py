"""Field checks for JSON bodies and query strings; each failure names the field."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import orjson

from llm_proxy.control.operations import (
    MAX_ALLOWED_MODELS,
    MAX_BUDGET_USD,
    MAX_DURATION_MINUTES,
    MAX_MODEL_PATTERN_LENGTH,
)
from llm_proxy.errors import InvalidField
from llm_proxy.models import nanousd

MISSING: Any = object()


def require_known(body: dict[str, Any], allowed: set[str]) -> None:
    for key in body:
        if key not in allowed:
            raise InvalidField(key, f"unknown field; expected one of {', '.join(sorted(allowed))}")


def text(body: dict[str, Any], key: str, *, required: bool, max_length: int) -> Any:
    value = body.get(key, MISSING)
    if value is MISSING or value is None:
        if required:
            raise InvalidField(key, "is required")
        return MISSING
    if not isinstance(value, str):
        raise InvalidField(key, "must be a string")
    value = value.strip()
    if required and not value:
        raise InvalidField(key, "must not be empty")
    if len(value) > max_length:
        raise InvalidField(key, f"must be at most {max_length} characters")
    return value


def boolean(body: dict[str, Any], key: str) -> Any:
    value = body.get(key, MISSING)
    if value is MISSING:
        return MISSING
    if not isinstance(value, bool):
        raise InvalidField(key, "must be true or false")
    return value


def integer(
    body: dict[str, Any], key: str, *, minimum: int, maximum: int, required: bool = False
) -> Any:
    """An int within bounds; MISSING when absent, None when explicitly null (and not required)."""
    value = body.get(key, MISSING)
    if value is MISSING or (value is None and required):
        if required:
            raise InvalidField(key, "is required")
        return MISSING
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidField(key, "must be an integer")
    if not minimum <= value <= maximum:
        raise InvalidField(key, f"must be between {minimum} and {maximum}")
    return value


def dollars(body: dict[str, Any], key: str, *, maximum: float = MAX_BUDGET_USD) -> Any:
    """An amount of US dollars above zero; MISSING when absent, None when explicitly null."""
    value = body.get(key, MISSING)
    if value is MISSING or value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidField(key, "must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidField(key, "must be a number")
    if not 0 < value <= maximum:
        raise InvalidField(key, f"must be greater than 0 and at most {maximum}")
    if nanousd(value) < 1:
        # Money is kept in whole nano-dollars: less would be stored as no budget at all.
        raise InvalidField(key, "must be at least 0.000000001")
    return value


def patterns(body: dict[str, Any], key: str) -> Any:
    """A non-empty list of model globs, duplicates dropped in order; MISSING or None as above."""
    value = body.get(key, MISSING)
    if value is MISSING or value is None:
        return value
    if not isinstance(value, list) or not value:
        raise InvalidField(key, "must be a non-empty list of model patterns")
    kept: dict[str, None] = {}
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise InvalidField(key, "every pattern must be a non-empty string")
        if len(item.strip()) > MAX_MODEL_PATTERN_LENGTH:
            raise InvalidField(
                key, f"every pattern must be at most {MAX_MODEL_PATTERN_LENGTH} characters"
            )
        kept[item.strip()] = None
    if len(kept) > MAX_ALLOWED_MODELS:
        raise InvalidField(key, f"must have at most {MAX_ALLOWED_MODELS} patterns")
    return list(kept)


def mapping(body: dict[str, Any], key: str, *, max_bytes: int | None = None) -> Any:
    value = body.get(key, MISSING)
    if value is MISSING or value is None:
        return MISSING
    if not isinstance(value, dict):
        raise InvalidField(key, "must be a JSON object")
    if max_bytes is not None and len(orjson.dumps(value)) > max_bytes:
        raise InvalidField(key, f"must be at most {max_bytes} bytes as JSON")
    return value


def duration_minutes(body: dict[str, Any]) -> int:
    value: int = integer(
        body, "duration_minutes", minimum=1, maximum=MAX_DURATION_MINUTES, required=True
    )
    return value


def timestamp(value: str | None, key: str) -> datetime | None:
    if value is None or value == "":
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidField(key, "must be an RFC 3339 timestamp") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def query_int(value: str | None, key: str, *, default: int, minimum: int, maximum: int) -> int:
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise InvalidField(key, "must be an integer") from None
    if not minimum <= number <= maximum:
        raise InvalidField(key, f"must be between {minimum} and {maximum}")
    return number
