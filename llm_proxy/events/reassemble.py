"""Reassemble a streamed answer into the one object the non-streaming endpoint would have returned.

Handles chat completions (content, refusal, tool calls, legacy function calls, finish reasons),
legacy completions and the Responses API. A stream cut short (client gone, capture limit) gives the
part that arrived; the ``usage`` of whichever chunk carried it is kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

JsonObject = dict[str, Any]

_HEAD_KEYS = ("id", "created", "model", "system_fingerprint", "service_tier")
_FINAL_RESPONSE_EVENTS = ("response.completed", "response.incomplete", "response.failed")


def _objects(datas: Iterable[bytes]) -> list[JsonObject]:
    out: list[JsonObject] = []
    for data in datas:
        if data == b"[DONE]":
            continue
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def reassemble(datas: Iterable[bytes]) -> object:
    """The completion object for a stream (given the data of its events), or the list of its JSON
    payloads if the shape is unknown."""
    payloads = _objects(datas)
    kinds = {p.get("object") for p in payloads}
    if "chat.completion.chunk" in kinds:
        return _chat(payloads)
    if "text_completion" in kinds:
        return _text(payloads)
    if any(str(p.get("type", "")).startswith("response.") for p in payloads):
        return _responses(payloads)
    return payloads


@dataclass(slots=True)
class _ToolCall:
    id: str | None = None
    type: str = "function"
    name: list[str] = field(default_factory=list)
    arguments: list[str] = field(default_factory=list)

    def render(self) -> JsonObject:
        call: JsonObject = {"id": self.id, "type": self.type}
        call["function"] = {"name": "".join(self.name), "arguments": "".join(self.arguments)}
        return call


@dataclass(slots=True)
class _Choice:
    role: str = "assistant"
    content: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    tool_calls: dict[int, _ToolCall] = field(default_factory=dict)
    function_call: _ToolCall | None = None
    finish_reason: str | None = None

    def add(self, delta: JsonObject) -> None:
        content = delta.get("content")
        if isinstance(content, str):
            self.content.append(content)
            if len(delta) == 1:  # the usual content chunk: nothing else to look at
                return
        if isinstance(delta.get("role"), str):
            self.role = delta["role"]
        if isinstance(delta.get("refusal"), str):
            self.refusal.append(delta["refusal"])
        for call in delta.get("tool_calls") or ():
            if isinstance(call, dict):
                index = call.get("index", len(self.tool_calls))
                if index not in self.tool_calls:
                    self.tool_calls[index] = _ToolCall()
                self._merge(self.tool_calls[index], call)
        if isinstance(delta.get("function_call"), dict):
            self.function_call = self.function_call or _ToolCall()
            self._merge(self.function_call, {"function": delta["function_call"]})

    @staticmethod
    def _merge(target: _ToolCall, call: JsonObject) -> None:
        if call.get("id"):
            target.id = call["id"]
        if call.get("type"):
            target.type = call["type"]
        function = call.get("function") or {}
        if isinstance(function.get("name"), str):
            target.name.append(function["name"])
        if isinstance(function.get("arguments"), str):
            target.arguments.append(function["arguments"])

    def message(self) -> JsonObject:
        message: JsonObject = {
            "role": self.role,
            "content": "".join(self.content) if self.content else None,
        }
        if self.refusal:
            message["refusal"] = "".join(self.refusal)
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i].render() for i in sorted(self.tool_calls)]
        if self.function_call is not None:
            message["function_call"] = self.function_call.render()["function"]
        return message


def _head(payloads: list[JsonObject], obj: str) -> JsonObject:
    head: JsonObject = {}
    missing = list(_HEAD_KEYS)
    for payload in payloads:  # every chunk repeats these: usually the first one has them all
        for key in list(missing):
            if payload.get(key) is not None:
                head[key] = payload[key]
                missing.remove(key)
        if not missing:
            break
    return {"id": head.pop("id", None), "object": obj, **head}


def _tail(result: JsonObject, payloads: list[JsonObject]) -> JsonObject:
    # Usage may come on any chunk (the usage-only final chunk, or inline as some providers do);
    # the last non-null one wins because it covers the whole answer.
    usage = [p["usage"] for p in payloads if isinstance(p.get("usage"), dict)]
    if usage:
        result["usage"] = usage[-1]
    errors = [p["error"] for p in payloads if p.get("error")]
    if errors:
        result["error"] = errors[-1]
    return result


def _chat(payloads: list[JsonObject]) -> JsonObject:
    choices: dict[int, _Choice] = {}
    for payload in payloads:
        for choice in payload.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            state = choices.get(index)
            if state is None:
                state = choices[index] = _Choice()
            delta = choice.get("delta")
            if isinstance(delta, dict):
                state.add(delta)
            if choice.get("finish_reason"):
                state.finish_reason = choice["finish_reason"]
    result = _head(payloads, "chat.completion")
    result["choices"] = [
        {"index": i, "message": choices[i].message(), "finish_reason": choices[i].finish_reason}
        for i in sorted(choices)
    ]
    return _tail(result, payloads)


def _text(payloads: list[JsonObject]) -> JsonObject:
    texts: dict[int, list[str]] = {}
    finish: dict[int, str | None] = {}
    for payload in payloads:
        for choice in payload.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            texts.setdefault(index, [])
            if isinstance(choice.get("text"), str):
                texts[index].append(choice["text"])
            if choice.get("finish_reason") or index not in finish:
                finish[index] = choice.get("finish_reason")
    result = _head(payloads, "text_completion")
    result["choices"] = [
        {"index": i, "text": "".join(texts[i]), "finish_reason": finish.get(i)}
        for i in sorted(texts)
    ]
    return _tail(result, payloads)


def _responses(payloads: list[JsonObject]) -> JsonObject:
    final = [p["response"] for p in payloads if p.get("type") in _FINAL_RESPONSE_EVENTS]
    if final and isinstance(final[-1], dict):
        result: JsonObject = final[-1]
        return result
    # Cut short: rebuild from the response head, the finished output items, and the deltas of the
    # items still being written.
    heads = [p["response"] for p in payloads if isinstance(p.get("response"), dict)]
    result = dict(heads[-1]) if heads else {"object": "response"}
    done = [p["item"] for p in payloads if p.get("type") == "response.output_item.done"]
    done_ids = {item.get("id") for item in done if isinstance(item, dict)}
    added = {
        p["item"].get("id"): p["item"]
        for p in payloads
        if p.get("type") == "response.output_item.added" and isinstance(p.get("item"), dict)
    }
    unfinished: dict[object, dict[str, list[str]]] = {}  # item id -> field -> its deltas
    for p in payloads:
        name = _DELTA_FIELDS.get(str(p.get("type")))
        if name is None or p.get("item_id") in done_ids or not isinstance(p.get("delta"), str):
            continue
        unfinished.setdefault(p.get("item_id"), {}).setdefault(name, []).append(p["delta"])
    output = list(done)
    for item_id, pieces in unfinished.items():
        fields = {name: "".join(deltas) for name, deltas in pieces.items()}
        output.append(_unfinished_item(added.get(item_id), fields))
    result["output"] = output
    return result


# The deltas that write an output item, by event type: the field of the item they build.
_DELTA_FIELDS = {
    "response.output_text.delta": "text",
    "response.refusal.delta": "refusal",
    "response.function_call_arguments.delta": "arguments",
    "response.custom_tool_call_input.delta": "input",
}


def _unfinished_item(added: object, fields: dict[str, str]) -> JsonObject:
    """An output item as far as its deltas wrote it: a message's text and refusal, or a tool
    call (as its output_item.added announced it) with its arguments or input so far."""
    if "text" in fields or "refusal" in fields:
        content: list[JsonObject] = []
        if "text" in fields:
            content.append({"type": "output_text", "text": fields["text"]})
        if "refusal" in fields:
            content.append({"type": "refusal", "refusal": fields["refusal"]})
        return {"type": "message", "role": "assistant", "content": content}
    item: JsonObject = dict(added) if isinstance(added, dict) else {}
    item.setdefault("type", "function_call" if "arguments" in fields else "custom_tool_call")
    item.update(fields)
    return item
