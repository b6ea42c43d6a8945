"""Usage numbers for an event: the upstream's own where it sent them, otherwise a tiktoken count.

Estimates follow OpenAI's published counting rules for chat (three tokens of framing per message,
one more for a ``name``, three to prime the reply); images, audio and hidden reasoning tokens cannot
be counted from the bodies and are left out, which is why such numbers are marked ``estimated``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from typing import Any, Final

import orjson

from llm_proxy import tokens
from llm_proxy.events.event import Usage

_PER_MESSAGE = 3
_PER_NAME = 1
_REPLY_PRIMING = 3


def _int(value: object) -> int | None:
    # What a JSON parser makes of a count: an int, not a bool; a negative count is no count (an
    # upstream reporting -1,000,000 tokens would otherwise shrink its token's tpm window).
    return value if type(value) is int and value >= 0 else None


def from_upstream(body: object) -> Usage | None:
    """Normalise the ``usage`` of a chat, completion, embedding or Responses API answer."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt = _int(usage.get("prompt_tokens", usage.get("input_tokens")))
    if prompt is None:
        return None
    completion = _int(usage.get("completion_tokens", usage.get("output_tokens"))) or 0
    # Never less than its parts: the window and the event count at least what was billed.
    total = max(_int(usage.get("total_tokens")) or 0, prompt + completion)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=total, source="upstream"
    )


def from_events(payloads: list[object]) -> tuple[Usage, object] | None:
    """The usage of a stream whose events are not reassembled into one answer (a streamed
    transcription's ``transcript.text.done``, an image generation's ``image_generation.completed``,
    speech's ``speech.audio.done``), with the event that carried it; the last one wins."""
    for payload in reversed(payloads):
        found = from_upstream(payload)
        if found is not None:
            return found, payload
    return None


# A `usage` key whose value is an object. Inside a JSON string every `"` is escaped, so the key's
# closing quote right after `usage` can only be a real key's, whatever text the model wrote.
_USAGE_KEY: Final = re.compile(rb'"usage"\s*:\s*\{')
_decoder: Final = json.JSONDecoder()


def usage_in_tail(tail: bytes) -> dict[str, Any] | None:
    """The last ``usage`` object in the end of a body whose head alone was captured (a chat stream's
    usage chunk, a Responses stream's ``response.completed``, a JSON answer's last fields), as a
    body carrying only it: ``{"usage": {...}}``; None when the tail holds no readable one."""
    matches = list(_USAGE_KEY.finditer(tail))
    for match in reversed(matches):
        text = tail[match.end() - 1 :].decode("utf-8", "replace")
        try:
            value, _ = _decoder.raw_decode(text)
        except ValueError:
            continue  # cut off at the end, or not JSON after all
        carrier = {"usage": value}
        if from_upstream(carrier) is not None:
            return carrier
    return None


def cached_prompt_tokens(body: object) -> int:
    """The prompt tokens the upstream served from its prompt cache (part of ``prompt_tokens``):
    ``prompt_tokens_details.cached_tokens`` (chat, completions), or ``input_tokens_details`` in the
    Responses API; 0 when it did not say."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0
    details = usage.get("prompt_tokens_details", usage.get("input_tokens_details"))
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return _int(cached) or 0


def _endpoint(path: str) -> str:
    path = path.rstrip("/")
    for endpoint in ("chat/completions", "completions", "embeddings", "moderations", "responses"):
        if path.endswith("/" + endpoint):
            return endpoint
    return ""


def estimate(path: str, request: object, response: object, model: str | None) -> Usage | None:
    """Count prompt and completion tokens from the bodies; None for endpoints without tokens."""
    if not isinstance(request, dict):
        return None
    endpoint = _endpoint(path)
    if endpoint == "chat/completions":
        prompt = _chat_prompt(request, model)
        completion = _chat_completion(response, model)
    elif endpoint == "completions":
        prompt = _inputs(request.get("prompt"), model)
        completion = sum(tokens.count(t, model) for t in _choice_texts(response))
    elif endpoint in ("embeddings", "moderations"):
        prompt, completion = _inputs(request.get("input"), model), 0
    elif endpoint == "responses":
        prompt = tokens.count(_str(request.get("instructions")), model)
        prompt += sum(tokens.count(t, model) for t in _texts(request.get("input")))
        completion = _responses_completion(response, model)
    else:
        return None
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        source="estimated",
    )


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _texts(value: object) -> Iterator[str]:
    """Every piece of text in a message content or Responses input, whatever its nesting."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)
    elif isinstance(value, dict):
        for key in ("text", "content", "arguments", "output", "refusal"):
            yield from _texts(value.get(key))


def _inputs(value: object, model: str | None) -> int:
    """Prompt/input fields: a string, strings, or pre-tokenised integer arrays."""
    if isinstance(value, str):
        return tokens.count(value, model)
    if isinstance(value, list):
        if value and all(_int(v) is not None for v in value):
            return len(value)
        return sum(_inputs(v, model) for v in value)
    return 0


def _chat_prompt(request: dict[str, Any], model: str | None) -> int:
    messages = request.get("messages")
    if not isinstance(messages, list):
        return 0
    total = _REPLY_PRIMING
    for message in messages:
        if not isinstance(message, dict):
            continue
        total += _PER_MESSAGE + tokens.count(_str(message.get("role")), model)
        total += sum(tokens.count(t, model) for t in _texts(message.get("content")))
        if isinstance(message.get("name"), str):
            total += _PER_NAME + tokens.count(message["name"], model)
        total += sum(tokens.count(t, model) for t in _calls(message))
    if request.get("tools") or request.get("functions"):
        # Tool schemas are rendered into the prompt in an undocumented format; their JSON is a
        # close stand-in.
        schemas = request.get("tools") or request.get("functions")
        total += tokens.count(orjson.dumps(schemas).decode(), model)
    return total


def _calls(message: dict[str, Any]) -> Iterator[str]:
    calls: Iterable[object] = message.get("tool_calls") or ()
    if isinstance(message.get("function_call"), dict):
        calls = [*calls, {"function": message["function_call"]}]
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            yield _str(function.get("name"))
            yield _str(function.get("arguments"))


def _choices(response: object) -> list[dict[str, Any]]:
    choices = response.get("choices") if isinstance(response, dict) else None
    return [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []


def _choice_texts(response: object) -> Iterator[str]:
    for choice in _choices(response):
        yield _str(choice.get("text"))


def _chat_completion(response: object, model: str | None) -> int:
    total = 0
    for choice in _choices(response):
        message = choice.get("message")
        if isinstance(message, dict):
            total += tokens.count(_str(message.get("content")), model)
            total += tokens.count(_str(message.get("refusal")), model)
            total += sum(tokens.count(t, model) for t in _calls(message))
    return total


def _responses_completion(response: object, model: str | None) -> int:
    output = response.get("output") if isinstance(response, dict) else None
    if not isinstance(output, list):
        return 0
    total = 0
    for item in output:
        if isinstance(item, dict):
            total += sum(tokens.count(t, model) for t in _texts(item.get("content")))
            total += tokens.count(_str(item.get("name")), model)
            total += tokens.count(_str(item.get("arguments")), model)
            total += tokens.count(_str(item.get("input")), model)  # a custom tool call's
    return total
