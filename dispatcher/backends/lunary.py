"""Lunary backend: ``POST {url}/v1/runs/ingest`` with a ``start`` and an ``end`` (or ``error``) run
event per request, in one request per batch.

The run id is a UUID derived from the event's id, so a redelivered event names the same run:
Lunary refuses the second ``start`` as a duplicate (counted, and treated as delivered) and the
``end`` just updates the run. Not from the request id: that is the client's ``X-Request-ID`` when
it sent one, which a client may give every call it makes (a trace id passed along), and those
calls would all become one run. The request id is in the run's metadata. ``tokensUsage`` carries the event's usage, upstream or estimated.

Lunary takes the bearer as the project id: a key that is not a UUID (mistyped, pasted with a quote
or the private key's prefix) is answered 402 "Incorrect project id format", so 402 refuses the key
like 401 and 403 do.

Lunary refuses a request body over 20 MB (413), so a batch goes out in as many POSTs as keep each
within ``max_request_bytes``, and a body (input, output, extra) over ``max_body_bytes`` is cut and
sent as text, so that every event fits in one. A 413 all the same (a smaller limit in front of a
self-hosted Lunary) splits that POST in halves, down to single events.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson

from dispatcher import metrics
from dispatcher.backends import Rejection
from dispatcher.backends.http import AUTH_STATUSES, masked, post_json
from dispatcher.backends.sizing import batches, fit
from llm_proxy.events.event import Event, parse_rfc3339, rfc3339

DEFAULT_URL = "https://api.lunary.ai"
# Fixed namespace, so the same request id gives the same run id in every dispatcher process.
_RUN_NAMESPACE = uuid.UUID("5d0f4f5e-8c1a-4f4e-9a57-6c6c6d2d7072")
_BODY_KEYS = frozenset({"messages", "prompt", "input", "model", "stream", "stream_options", "user"})
_DUPLICATE = "already exists"
_KEY_REFUSED = AUTH_STATUSES | {402}
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024  # well within Lunary's 20 MB
_ENVELOPE = (b'{"events":[', b"]}")
_TOO_LARGE = "HTTP 413:"  # how post_json's refusal of a body too large begins
# A NUL as JSON writes it: "\u0000" not preceded by a backslash of its own (an escaped
# backslash, then "u0000", is text).
_NUL = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")


def run_id(event_id: str) -> str:
    return str(uuid.uuid5(_RUN_NAMESPACE, event_id))


def _input(request: object) -> object:
    if isinstance(request, dict):
        for key in ("messages", "input", "prompt"):
            if key in request:
                return request[key]
    return request


def _output(response: object) -> object:
    if not isinstance(response, dict):
        return response
    choices = response.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        first = choices[0]
        if "message" in first:
            return first["message"] if len(choices) == 1 else [c.get("message") for c in choices]
        if "text" in first:
            return {"role": "assistant", "content": first["text"]}
    if isinstance(response.get("output"), list):
        return response["output"]
    return response


def _error_message(event: Event) -> str:
    response = event["response"]
    error = response.get("error") if isinstance(response, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return f"HTTP {event['status']}" + (f" ({event['error']})" if event["error"] else "")


def _fitted(value: object, limit: int) -> object:
    shown, cut = fit(value, limit)
    return shown if cut is None else cut


def run_events(
    event: Event, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> list[dict[str, Any]]:
    """The ``start`` and ``end``/``error`` run events of one request, each body within
    ``max_body_bytes`` of JSON."""
    rid = run_id(event["id"])
    request = event["request"]
    ended = rfc3339(parse_rfc3339(event["timestamp"]) + event["duration_ms"] / 1000.0)
    usage = event["usage"]
    metadata: dict[str, object] = {
        "project_id": event["project_id"],
        "token_id": event["token_id"],
        "request_id": event["request_id"],
        "path": event["path"],
        "status": event["status"],
    }
    if usage is not None:
        metadata["usage_source"] = usage["source"]
    if event["error"]:
        metadata["error"] = event["error"]
    start: dict[str, Any] = {
        "type": "llm",
        "event": "start",
        "runId": rid,
        "name": event["model"] or event["path"],
        "timestamp": event["timestamp"],
        "input": _fitted(_input(request), max_body_bytes),
        "metadata": metadata,
        "tags": ["llm-proxy"],
    }
    if isinstance(request, dict):
        extra, cut = fit({k: v for k, v in request.items() if k not in _BODY_KEYS}, max_body_bytes)
        start["extra"] = extra if cut is None else {"truncated": cut}  # Lunary wants an object
        if isinstance(request.get("user"), str):
            start["userId"] = request["user"]
    if event["status"] == 0 or event["status"] >= 400:
        end: dict[str, Any] = {
            "type": "llm",
            "event": "error",
            "runId": rid,
            "timestamp": ended,
            "error": {"message": _error_message(event)},
        }
    else:
        end = {
            "type": "llm",
            "event": "end",
            "runId": rid,
            "timestamp": ended,
            "output": _fitted(_output(event["response"]), max_body_bytes),
        }
        if usage is not None:
            end["tokensUsage"] = {
                "prompt": usage["prompt_tokens"],
                "completion": usage["completion_tokens"],
            }
    return [start, end]


class LunaryBackend:
    name = "lunary"

    def __init__(
        self,
        public_key: str,
        *,
        url: str = DEFAULT_URL,
        timeout: float = 30.0,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        self.url = url.rstrip("/") + "/v1/runs/ingest"
        self._headers = {"Authorization": f"Bearer {public_key}"}
        self._secrets = (public_key,)  # masked wherever the service echoes them
        self._timeout = timeout
        self._max_body_bytes = max_body_bytes
        self._max_request_bytes = max_request_bytes
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"LunaryBackend(url={self.url!r})"  # never the key

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))

    async def send(self, events: Sequence[Event]) -> dict[int, Rejection]:
        assert self._session is not None
        encoded = [(i, self._runs(event)) for i, event in enumerate(events)]
        room = self._max_request_bytes - sum(map(len, _ENVELOPE))
        refused: dict[int, Rejection] = {}
        posts = list(
            batches(encoded, lambda item: len(item[1]) + 1, max_items=len(events), max_bytes=room)
        )
        while posts:
            post = posts.pop(0)
            body = _ENVELOPE[0] + b",".join(runs for _, runs in post) + _ENVELOPE[1]
            failed, answer = await post_json(
                self._session,
                self.url,
                body,
                self._headers,
                auth_statuses=_KEY_REFUSED,
                secrets=self._secrets,
            )
            if failed is None:
                refused.update(self._refusals([(i, events[i]) for i, _ in post], answer))
                continue
            if failed.reason.startswith(_TOO_LARGE) and len(post) > 1:
                # What is in front of Lunary (a self-hosted one's proxy) takes less than we
                # thought: halves, down to single events, rather than refuse every event.
                half = len(post) // 2
                posts[:0] = [post[:half], post[half:]]
                continue
            refused.update((i, failed) for i, _ in post)
            if failed.auth or failed.retryable:
                # The key, the service or the network: the next POST would fare no better.
                refused.update((i, failed) for later in posts for i, _ in later)
                break
        return refused

    def _runs(self, event: Event) -> bytes:
        """The event's run events as JSON array items, to be joined into a POST's body."""
        runs = run_events(event, max_body_bytes=self._max_body_bytes)
        text = b",".join(orjson.dumps(run) for run in runs)
        # Lunary keeps runs in PostgreSQL, whose text and jsonb cannot hold a NUL: a run with
        # one fails there for good. It is shown as U+FFFD instead.
        return _NUL.sub(rb"\1\\ufffd", text) if b"\\u0000" in text else text

    def _refusals(self, sent: Sequence[tuple[int, Event]], answer: object) -> dict[int, Rejection]:
        results = answer.get("results") if isinstance(answer, dict) else None
        if not isinstance(results, list):
            return {}
        index = {run_id(e["id"]): i for i, e in sent}
        refused: dict[int, Rejection] = {}
        for result in results:
            if not isinstance(result, dict) or result.get("success", True):
                continue
            i = index.get(str(result.get("id")))
            reason = str(result.get("error", "refused"))
            if i is None:
                continue
            if _DUPLICATE in reason:
                metrics.DUPLICATES.labels(self.name).inc()
                continue
            # Lunary answers 200 with per-run errors for runs it will never take (bad data).
            refused[i] = Rejection(f"lunary: {masked(reason, self._secrets)}", retryable=False)
        return refused

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
