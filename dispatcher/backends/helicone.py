"""Helicone backend: the async (custom) logging API, one POST per event.

``POST {url}`` with ``Authorization: Bearer <key>`` and ``{providerRequest, providerResponse,
timing}``; timing carries the real request start, end and time to first token. The event id is sent
as ``Helicone-Request-Id`` so a redelivered event is the same request to Helicone. Bodies larger
than ``max_body_bytes`` are cut and sent as text rather than risking a refusal of the whole log.
"""

from __future__ import annotations

import asyncio
import string
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from dispatcher.backends import Rejection
from dispatcher.backends.http import post_json
from dispatcher.backends.sizing import fit
from llm_proxy.events.event import Event, parse_rfc3339

DEFAULT_URL = "https://api.worker.helicone.ai/custom/v1/log"
_CUSTOM_MODEL_URL = "custom-model-nopath"  # what the custom log endpoint expects as the URL
_VISIBLE_ASCII = string.printable.strip() + " "


def _header_value(text: str) -> str:
    """``text`` as a header value: Helicone reads ``meta`` into a fetch ``Headers``, which throws
    on a character above U+00FF or a control character (a path holds what its client chose), and
    its worker answers 500 for the log, again on every retry. Such characters percent-encoded."""
    if text.isascii() and text.isprintable():
        return text
    return quote(text, safe=_VISIBLE_ASCII)


def _time(epoch: float) -> dict[str, int]:
    millis = round(epoch * 1000)
    return {"seconds": millis // 1000, "milliseconds": millis % 1000}


def payload(event: Event, *, max_body_bytes: int) -> dict[str, Any]:
    start = parse_rfc3339(event["timestamp"])
    model = event["model"] or "unknown"

    request, request_text = fit(event["request"], max_body_bytes)
    if isinstance(request, dict):
        request_json: dict[str, Any] = request
    else:
        # Helicone needs a JSON object here; anything else is carried as text beside the model.
        shown = request_text if request_text is not None else request
        request_json = {"model": model, "body": shown}

    response, response_text = fit(event["response"], max_body_bytes)
    usage = event["usage"]
    provider_response: dict[str, Any] = {
        "status": event["status"] or (504 if event["error"] == "upstream_timeout" else 502),
        "headers": {"content-type": "application/json"},
    }
    if isinstance(response, dict):
        response_json = dict(response)
        if usage is None and isinstance(response_json.get("usage"), dict):
            # A fetched stored response shows the usage of the call that made it, logged then:
            # Helicone would charge it again for every fetch.
            del response_json["usage"]
        elif usage is not None and not isinstance(response_json.get("usage"), dict):
            # Estimated usage still lets Helicone price the request.
            response_json["usage"] = {
                "prompt_tokens": usage["prompt_tokens"],
                "completion_tokens": usage["completion_tokens"],
                "total_tokens": usage["total_tokens"],
            }
        provider_response["json"] = response_json
    else:
        text = response_text if response_text is not None else response
        provider_response["textBody"] = (
            text if isinstance(text, str) else orjson.dumps(text).decode()
        )

    meta = {
        "Helicone-Request-Id": event["id"],
        "Helicone-Property-Project": event["project_id"],
        "Helicone-Property-Token": event["token_id"],
        "Helicone-Property-Path": _header_value(event["path"]),
        "Helicone-Property-Proxy-Request-Id": _header_value(event["request_id"]),
    }
    if usage is not None:
        meta["Helicone-Property-Usage-Source"] = usage["source"]
    if event["error"]:
        meta["Helicone-Property-Error"] = event["error"]

    timing: dict[str, Any] = {
        "startTime": _time(start),
        "endTime": _time(start + event["duration_ms"] / 1000.0),
    }
    if event["stream"] and event["ttfb_ms"] is not None:
        timing["timeToFirstToken"] = round(event["ttfb_ms"])
    return {
        "providerRequest": {"url": _CUSTOM_MODEL_URL, "json": request_json, "meta": meta},
        "providerResponse": provider_response,
        "timing": timing,
    }


class HeliconeBackend:
    name = "helicone"

    def __init__(
        self,
        api_key: str,
        *,
        url: str = DEFAULT_URL,
        max_body_bytes: int = 256 * 1024,  # per body: the whole log stays well under 1 MiB
        concurrency: int = 8,
        timeout: float = 30.0,
    ) -> None:
        self.url = url
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._secrets = (api_key,)  # masked wherever the service echoes them
        self._max_body_bytes = max_body_bytes
        self._concurrency = concurrency
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"HeliconeBackend(url={self.url!r})"  # never the key

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))

    async def send(self, events: Sequence[Event]) -> dict[int, Rejection]:
        assert self._session is not None
        session = self._session
        gate = asyncio.Semaphore(self._concurrency)
        key_refused: Rejection | None = None

        async def one(body: dict[str, Any]) -> Rejection | None:
            nonlocal key_refused
            async with gate:
                if key_refused is not None:
                    return key_refused  # the key was refused: spare the service the rest
                refused, _ = await post_json(
                    session, self.url, body, self._headers, secrets=self._secrets
                )
            if refused is not None and refused.auth:
                key_refused = refused
            return refused

        # Every body first: an event that cannot be rendered raises before any is sent, so a
        # batch tried again (or in halves, see worker.py) is not sent twice.
        rendered = [payload(event, max_body_bytes=self._max_body_bytes) for event in events]
        results = await asyncio.gather(*(one(body) for body in rendered))
        return {i: r for i, r in enumerate(results) if r is not None}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
