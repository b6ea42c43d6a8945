"""Field checks for JSON bodies and query strings; each failure names the field.

The OpenAPI document (:mod:`llm_proxy.control.openapi`) states these same rules as schemas, built
from the constants below, and a test holds the two to the same verdict on every body it tries.
Hence rules a schema can state: lengths count what was sent (before trimming), lists count their
items as sent (before duplicates are dropped), and a number is judged by its value, so ``286.0`` is
the whole number 286, as JSON Schema has it.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from multidict import MultiMapping

from llm_proxy.control.operations import (
    MAX_ALLOWED_MODELS,
    MAX_BUDGET_USD,
    MAX_DURATION_MINUTES,
    MAX_MODEL_PATTERN_LENGTH,
)
from llm_proxy.crypto import is_sendable_key, redact
from llm_proxy.errors import InvalidField
from llm_proxy.json_keys import RepeatedKey, unrepeated_keys

MISSING: Any = object()

MAX_NAME_LENGTH = 200
MAX_API_KEY_LENGTH = 1000
MAX_DESCRIPTION_LENGTH = 2000
MAX_ID_LENGTH = 100
MAX_TOKEN_VALUE_LENGTH = 300
MAX_PAGE = 10**9
MAX_PAGE_SIZE = 100
# Money is kept in whole nano-dollars: less would be stored as no budget at all.
MIN_BUDGET_USD = 1e-9

_SCALES = (
    (10**18, "quintillion"),
    (10**15, "quadrillion"),
    (10**12, "trillion"),
    (10**9, "billion"),
    (10**6, "million"),
)


def readable(number: int) -> str:
    """A bound as a person reads it: ``525,600``, ``1 billion``, ``2^62 (about 4.6 quintillion)``."""
    for scale, name in _SCALES:
        if number >= scale and number % scale == 0:
            return f"{number // scale:,} {name}"
    if number >= 10**6 and number & (number - 1) == 0:
        scale, name = next((s, n) for s, n in _SCALES if number >= s)
        return f"2^{number.bit_length() - 1} (about {number / scale:.1f} {name})"
    return f"{number:,}"


def whole_number(minimum: int, maximum: int, unit: str = "") -> str:
    """What an integer field must be, e.g. ``a whole number of minutes from 1 to 525,600``."""
    of_unit = f" of {unit}" if unit else ""
    return f"a whole number{of_unit} from {readable(minimum)} to {readable(maximum)}"


def _shown(value: Any) -> str:
    """A refused value as a message may show it: numbers and literals, never a caller's text."""
    if value is None or isinstance(value, bool):
        return orjson.dumps(value).decode()
    if isinstance(value, int | float):
        return repr(value) if abs(value) < 10**21 else "a number that large"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


# PostgreSQL stores no NUL character in text or JSON: refused here for every store alike, rather
# than a 500 from one of them.
_NUL = "must not contain the NUL character (U+0000)"


MAX_JSON_DEPTH = 64
"""Deepest nesting of a metadata object: JSON that orjson can write back (it stops at 255 levels)
and any reader can walk."""


def _nul_or_too_deep(value: Any) -> str | None:
    """What is wrong with a JSON value's strings or nesting, if anything."""
    # A loop, not recursion: a small body can nest deeper than Python's recursion limit.
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return _NUL
        elif isinstance(item, dict | list):
            if depth >= MAX_JSON_DEPTH:
                return f"must not nest deeper than {MAX_JSON_DEPTH} levels"
            if isinstance(item, dict):
                pending.extend((key, depth) for key in item)
                pending.extend((inner, depth + 1) for inner in item.values())
            else:
                pending.extend((inner, depth + 1) for inner in item)
    return None


class _OutOfRange:
    """A number in JSON text that no 64-bit integer or double holds, as :func:`ambiguity` reads it."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


# Digits past which an integer cannot fit in 64 bits: checked before int(), which refuses more
# than 4,300 digits.
_MAX_64_BIT_DIGITS = 20


def _within_64_bits(text: str) -> int | _OutOfRange:
    if len(text.lstrip("-")) <= _MAX_64_BIT_DIGITS and -(2**63) <= (number := int(text)) < 2**64:
        return number
    return _OutOfRange(f"the integer {text[:40]} does not fit in 64 bits")


def _within_a_double(text: str) -> float | _OutOfRange:
    number = float(text)
    if math.isfinite(number):
        return number
    return _OutOfRange(f"the number {text[:40]} is too large for a double")


def _out_of_range(value: Any) -> _OutOfRange | None:
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, _OutOfRange):
            return item
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return None


@dataclass(frozen=True, slots=True)
class Ambiguity:
    """What JSON text holds that orjson reads one way of several, or not at all; ``field`` is the
    member of the outermost object that holds it, when it is a value's (a number out of range)."""

    problem: str
    field: str | None = None


def ambiguity(raw: bytes | str) -> Ambiguity | None:
    """What orjson reads silently one way of several in JSON, if anything: a repeated key (it keeps
    the last) and an integer past 64 bits (it makes a float of it, losing digits for good in
    `metadata`); and a number past a double's range, which it refuses as no JSON at all."""
    try:
        parsed = json.loads(
            raw,
            object_pairs_hook=unrepeated_keys,
            parse_int=_within_64_bits,
            parse_float=_within_a_double,
            strict=False,
        )
    except RepeatedKey as exc:
        # The key is the caller's: named masked, as an unknown field's name is.
        return Ambiguity(redact(str(exc)))
    except (ValueError, RecursionError):
        return None  # read differently by the two parsers in no way that matters: orjson's holds
    members = parsed.items() if isinstance(parsed, dict) else [(None, parsed)]
    for key, value in members:
        if (found := _out_of_range(value)) is not None:
            return Ambiguity(found.problem, key)
    return None


def require_known(body: dict[str, Any], allowed: set[str]) -> None:
    for key in body:
        if key not in allowed:
            # The name is the caller's: a token's value mistyped as one is named masked.
            expected = ", ".join(sorted(allowed))
            raise InvalidField(redact(key), f"unknown field; expected one of {expected}")


def text(body: dict[str, Any], key: str, *, required: bool, max_length: int) -> Any:
    """A string, trimmed; a required one must not be blank. Null is refused, never "absent"."""
    value = body.get(key, MISSING)
    if value is MISSING:
        if required:
            raise InvalidField(key, "is required")
        return MISSING
    if not isinstance(value, str):
        raise InvalidField(key, f"must be a string, not {_shown(value)}")
    if len(value) > max_length:
        raise InvalidField(key, f"must be at most {readable(max_length)} characters")
    if "\x00" in value:
        raise InvalidField(key, _NUL)
    value = value.strip()
    if required and not value:
        raise InvalidField(key, "must not be empty")
    return value


# Control characters (C0, DEL, C1) a name may not hold once trimmed, and those a description may
# not: it keeps tabs and line breaks (a text area sends them). A line break in a name forges a row
# of `manage project list`, an escape sequence repaints the operator's terminal.
_NAME_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_DESCRIPTION_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def name(body: dict[str, Any], *, required: bool) -> Any:
    """A project's ``name``: text (trimmed, as :func:`text`) on one line, no control character."""
    value = text(body, "name", required=required, max_length=MAX_NAME_LENGTH)
    if value is not MISSING and _NAME_CONTROLS.search(value):
        raise InvalidField(
            "name", "must not contain control characters such as line breaks or escapes"
        )
    return value


def description(body: dict[str, Any]) -> Any:
    """A project's ``description``: text (trimmed, as :func:`text`) whose only control characters
    are tabs and line breaks."""
    value = text(body, "description", required=False, max_length=MAX_DESCRIPTION_LENGTH)
    if value is not MISSING and _DESCRIPTION_CONTROLS.search(value):
        raise InvalidField(
            "description", "must not contain control characters other than tabs and line breaks"
        )
    return value


def upstream_key(body: dict[str, Any], *, required: bool) -> Any:
    """A project's ``api_key``: text (trimmed, as :func:`text`) that can go into a header."""
    value = text(body, "api_key", required=required, max_length=MAX_API_KEY_LENGTH)
    if value is not MISSING and not is_sendable_key(value):
        # Sent upstream, a CR would inject a header and an LF fails every request of the project.
        raise InvalidField("api_key", "must not contain control characters such as line breaks")
    return value


def boolean(body: dict[str, Any], key: str) -> Any:
    value = body.get(key, MISSING)
    if value is MISSING:
        return MISSING
    if not isinstance(value, bool):
        raise InvalidField(key, f"must be true or false, not {_shown(value)}")
    return value


def integer(
    body: dict[str, Any],
    key: str,
    *,
    minimum: int,
    maximum: int,
    required: bool = False,
    nullable: bool = False,
    unit: str = "",
) -> Any:
    """An int within bounds; MISSING when absent, None when null and ``nullable``."""
    value = body.get(key, MISSING)
    if value is MISSING:
        if required:
            raise InvalidField(key, "is required")
        return MISSING
    if value is None and nullable:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON has one kind of number: 286.0 is 286
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        hint = "; null for no limit" if nullable else ""
        expected = whole_number(minimum, maximum, unit)
        raise InvalidField(key, f"must be {expected}{hint}, not {_shown(value)}")
    return value


def dollars(
    body: dict[str, Any], key: str, *, maximum: float = MAX_BUDGET_USD, nullable: bool = False
) -> Any:
    """An amount of US dollars, at least a nano-dollar; MISSING when absent, None when null and
    ``nullable``."""
    value = body.get(key, MISSING)
    if value is MISSING or (value is None and nullable):
        return value
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not MIN_BUDGET_USD <= value <= maximum
    ):
        hint = "; null for no limit" if nullable else ""
        raise InvalidField(
            key,
            "must be an amount in US dollars from 0.000000001 (one nano-dollar)"
            f" to {readable(int(maximum))}{hint}, not {_shown(value)}",
        )
    return value


def patterns(body: dict[str, Any], key: str, *, nullable: bool = False) -> Any:
    """A non-empty list of model globs, each trimmed, duplicates dropped in order; MISSING when
    absent, None when null and ``nullable``."""
    value = body.get(key, MISSING)
    if value is MISSING or (value is None and nullable):
        return value
    if not isinstance(value, list) or not value:
        hint = "; null for any model" if nullable else ""
        raise InvalidField(key, f"must be a non-empty list of model patterns{hint}")
    if len(value) > MAX_ALLOWED_MODELS:
        raise InvalidField(key, f"must have at most {MAX_ALLOWED_MODELS} patterns")
    kept: dict[str, None] = {}
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise InvalidField(key, "every pattern must be a non-empty string")
        if "\x00" in item:
            raise InvalidField(key, _NUL)
        if len(item) > MAX_MODEL_PATTERN_LENGTH:
            raise InvalidField(
                key, f"every pattern must be at most {MAX_MODEL_PATTERN_LENGTH} characters"
            )
        kept[item.strip()] = None
    return list(kept)


def mapping(body: dict[str, Any], key: str, *, max_bytes: int | None = None) -> Any:
    value = body.get(key, MISSING)
    if value is MISSING:
        return MISSING
    if not isinstance(value, dict):
        raise InvalidField(key, f"must be a JSON object, not {_shown(value)}")
    if (wrong := _nul_or_too_deep(value)) is not None:
        raise InvalidField(key, wrong)
    if max_bytes is not None and len(orjson.dumps(value)) > max_bytes:
        raise InvalidField(key, f"must be at most {max_bytes} bytes as JSON")
    return value


def duration_minutes(body: dict[str, Any]) -> int:
    value: int = integer(
        body,
        "duration_minutes",
        minimum=1,
        maximum=MAX_DURATION_MINUTES,
        required=True,
        unit="minutes",
    )
    return value


# A positive offset written into a URL unencoded ("…T10:00:00+02:00"), which a query string reads
# as "…T10:00:00 02:00": the space can only be the plus sign it stood for.
_PLUS_READ_AS_SPACE = re.compile(r"([Tt ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?) (\d{2}:\d{2})\Z")


def timestamp(value: str | None, key: str) -> datetime | None:
    if value is None or value == "":
        return None
    value = _PLUS_READ_AS_SPACE.sub(r"\1+\2", value)
    try:
        # RFC 3339 allows "z" in lower case too; fromisoformat takes only "Z".
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        # In UTC, as the stores compare it: an offset can carry a moment at either end of the
        # calendar past year 1 or 9999, which no datetime holds.
        return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except ValueError:
        raise InvalidField(key, "must be an RFC 3339 timestamp") from None
    except OverflowError:
        raise InvalidField(key, "must be a moment from year 1 to year 9999 in UTC") from None


def require_known_query(query: MultiMapping[str], allowed: set[str]) -> None:
    """Refuse a query parameter the endpoint does not take: a misspelt filter ignored would widen
    the answer to everything, and a script acting on it would act on everything."""
    unknown = sorted(set(query) - allowed)
    if unknown:
        expected = f"expected {', '.join(sorted(allowed))}" if allowed else "none is taken here"
        # Named masked when shaped like a key, as an unknown body field is.
        raise InvalidField(redact(unknown[0]), f"unknown query parameter; {expected}")
    # Each is read once: of a repeated one, the first would be taken and the others ignored, so
    # ?project_id=A&project_id=B would answer A's tokens as if that were all that was asked.
    repeated = sorted({key for key in query if len(query.getall(key)) > 1})
    if repeated:
        raise InvalidField(repeated[0], "is given more than once; give it once")


def query_int(value: str | None, key: str, *, default: int, minimum: int, maximum: int) -> int:
    """A whole number given as plain ASCII digits: ``int()`` alone also takes ``1_0``, ``+1``,
    `` 1`` and digits of other scripts."""
    if value is None or value == "":
        return default
    number = None
    if value.isascii() and value.isdigit():
        with contextlib.suppress(ValueError):  # more digits than int() converts
            number = int(value)
    if number is None or not minimum <= number <= maximum:
        raise InvalidField(key, f"must be {whole_number(minimum, maximum)}")
    return number
