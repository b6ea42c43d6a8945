"""Lunary backend: ``POST {url}/v1/runs/ingest`` with a ``start`` and an ``end`` (or ``error``) run
event per request, in one request per batch.

The run id is a UUID derived from the proxy's request id, so a redelivered event names the same run:
Lunary refuses the second ``start`` as a duplicate (counted, and treated as delivered) and the
``end`` just updates the run. ``tokensUsage`` carries the event's usage, upstream or estimated.

Lunary takes the bearer as the project id: a key that is not a UUID (mistyped, pasted with a quote
or the private key's prefix) is answered 402 "Incorrect project id format", so 402 refuses the key
like 401 and 403 do.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import aiohttp

from dispatcher import metrics
from dispatcher.backends import BackendError, Rejection
from dispatcher.backends.http import AUTH_STATUSES, post_json
from llm_proxy.events.event import Event, parse_rfc3339, rfc3339

DEFAULT_URL = "https://api.lunary.ai"
# Fixed namespace, so the same request id gives the same run id in every dispatcher process.
_RUN_NAMESPACE = uuid.UUID("5d0f4f5e-8c1a-4f4e-9a57-6c6c6d2d7072")
_BODY_KEYS = frozenset({"messages", "prompt", "input", "model", "stream", "stream_options", "user"})
_DUPLICATE = "already exists"
_KEY_REFUSED = AUTH_STATUSES | {402}


def run_id(request_id: str) -> str:
    return str(uuid.uuid5(_RUN_NAMESPACE, request_id))


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


def run_events(event: Event) -> list[dict[str, Any]]:
    """The ``start`` and ``end``/``error`` run events of one request."""
    rid = run_id(event["request_id"])
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
        "input": _input(request),
        "metadata": metadata,
        "tags": ["llm-proxy"],
    }
    if isinstance(request, dict):
        start["extra"] = {k: v for k, v in request.items() if k not in _BODY_KEYS}
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
            "output": _output(event["response"]),
        }
        if usage is not None:
            end["tokensUsage"] = {
                "prompt": usage["prompt_tokens"],
                "completion": usage["completion_tokens"],
            }
    return [start, end]


class LunaryBackend:
    name = "lunary"

    def __init__(self, public_key: str, *, url: str = DEFAULT_URL, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/") + "/v1/runs/ingest"
        self._headers = {"Authorization": f"Bearer {public_key}"}
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"LunaryBackend(url={self.url!r})"  # never the key

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))

    async def send(self, events: Sequence[Event]) -> dict[int, Rejection]:
        assert self._session is not None
        body = {"events": [run for event in events for run in run_events(event)]}
        refused, answer = await post_json(
            self._session, self.url, body, self._headers, auth_statuses=_KEY_REFUSED
        )
        if refused is not None:
            raise BackendError(refused.reason, retryable=refused.retryable, auth=refused.auth)
        return self._refusals(events, answer)

    def _refusals(self, events: Sequence[Event], answer: object) -> dict[int, Rejection]:
        results = answer.get("results") if isinstance(answer, dict) else None
        if not isinstance(results, list):
            return {}
        index = {run_id(e["request_id"]): i for i, e in enumerate(events)}
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
            refused[i] = Rejection(f"lunary: {reason}", retryable=False)
        return refused

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
