"""Small fake Helicone and Lunary servers that check payloads the way the real services need them.

Shapes follow Helicone's async logging API (``/custom/v1/log``: providerRequest, providerResponse,
timing) and Lunary's ingestion endpoint (``/v1/runs/ingest``, as its backend validates and stores
runs: start before end, UUID run ids, duplicate starts refused per run, no NUL in what it stores).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from aiohttp import web

HELICONE_KEY = "sk-helicone-test"
HELICONE_READ_ONLY_KEY = "sk-helicone-read-only"  # a real key without the right to write logs
LUNARY_KEY = "0b5a7e2c-3f1d-4c8e-9a6b-2d4f6e8a0c1e"  # a project id, as Lunary's public keys are


@contextmanager
def serving(app: web.Application) -> Iterator[str]:
    """``app`` on a loopback port, run by a thread of its own; yields its base URL.

    For tests that drive the CLI in-process: the CLI runs its own event loop.
    """
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    host, port = runner.addresses[0][:2]
    thread = threading.Thread(target=loop.run_forever, name="fake-backend", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def helicone_problems(body: Any) -> list[str]:
    problems = []
    if not isinstance(body, dict):
        return ["body is not an object"]
    request = body.get("providerRequest")
    if not isinstance(request, dict):
        problems.append("providerRequest missing")
    else:
        if not isinstance(request.get("url"), str):
            problems.append("providerRequest.url must be a string")
        if not isinstance(request.get("json"), dict):
            problems.append("providerRequest.json must be an object")
        meta = request.get("meta")
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            problems.append("providerRequest.meta must map strings to strings")
    response = body.get("providerResponse")
    if not isinstance(response, dict):
        problems.append("providerResponse missing")
    else:
        if not _is_int(response.get("status")):
            problems.append("providerResponse.status must be an integer")
        if not isinstance(response.get("headers"), dict):
            problems.append("providerResponse.headers must be an object")
        if not isinstance(response.get("json"), dict) and not isinstance(
            response.get("textBody"), str
        ):
            problems.append("providerResponse needs json (object) or textBody (string)")
    timing = body.get("timing")
    if timing is not None:
        stamps = []
        for key in ("startTime", "endTime"):
            stamp = timing.get(key) if isinstance(timing, dict) else None
            if not (
                isinstance(stamp, dict)
                and _is_int(stamp.get("seconds"))
                and _is_int(stamp.get("milliseconds"))
                and 0 <= stamp["milliseconds"] < 1000
            ):
                problems.append(f"timing.{key} must be {{seconds, milliseconds}}")
            else:
                stamps.append(stamp["seconds"] * 1000 + stamp["milliseconds"])
        if len(stamps) == 2 and stamps[1] < stamps[0]:
            problems.append("timing.endTime before startTime")
        ttft = timing.get("timeToFirstToken") if isinstance(timing, dict) else None
        if ttft is not None and not (isinstance(ttft, int | float) and ttft >= 0):
            problems.append("timing.timeToFirstToken must be a non-negative number")
    return problems


def meta_not_headers(body: Any) -> bool:
    """Whether a value of ``providerRequest.meta`` is no value a fetch ``Headers`` takes: a
    ByteString (no character above U+00FF) without NUL, CR or LF."""
    request = body.get("providerRequest") if isinstance(body, dict) else None
    meta = request.get("meta") if isinstance(request, dict) else None
    if not isinstance(meta, dict):
        return False
    return any(
        isinstance(value, str)
        and (max(map(ord, value), default=0) > 0xFF or set(value) & set("\0\r\n"))
        for value in meta.values()
    )


class FakeHelicone:
    def __init__(self, max_body: int = 1024 * 1024, key: str = HELICONE_KEY) -> None:
        self.key = key
        self.logs: list[dict[str, Any]] = []
        self.answers: list[int] = []  # statuses to answer first, before accepting
        self.answer_headers: dict[str, str] = {}  # sent with those answers (Retry-After, say)
        # The body of those answers instead of a JSON error: a load balancer's own page, say.
        self.answer_body: bytes | None = None
        self.seen: list[float] = []  # when each request came (time.monotonic)
        self.refused_keys = 0  # requests answered 401 or 403
        self.max_body = max_body
        self.delay = 0.0  # seconds each request takes, for a client to be stopped midway
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_post("/custom/v1/log", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(time.monotonic())
        if self.delay:
            await asyncio.sleep(self.delay)
        authorization = request.headers.get("Authorization")
        if authorization == f"Bearer {HELICONE_READ_ONLY_KEY}":
            self.refused_keys += 1
            return web.json_response({"error": "Forbidden: key cannot write logs"}, status=403)
        if authorization != f"Bearer {self.key}":
            self.refused_keys += 1
            # Services do echo what they refused; the dispatcher must never pass it on.
            return web.json_response({"error": f"Unauthorized: {authorization}"}, status=401)
        if self.answers:
            if self.answer_body is not None:
                return web.Response(
                    body=self.answer_body,
                    status=self.answers.pop(0),
                    headers={"Content-Type": "text/html", **self.answer_headers},
                )
            # Some services echo the request's headers with an error, the key among them.
            echo = f"scripted; got Authorization: {authorization}"
            return web.json_response(
                {"error": echo}, status=self.answers.pop(0), headers=self.answer_headers
            )
        raw = await request.read()
        if len(raw) > self.max_body:
            return web.json_response({"error": "Payload too large"}, status=413)
        body = await request.json()
        if meta_not_headers(body):
            # Helicone's worker reads providerRequest.meta into a fetch ``Headers``, which throws
            # on a value that is no header value: the worker answers as for any exception.
            return web.Response(text="Worker threw exception", status=500)
        problems = helicone_problems(body)
        if problems:
            return web.json_response({"error": problems}, status=400)
        self.logs.append(body)
        return web.json_response({})


LUNARY_TYPES = {
    "llm",
    "chain",
    "agent",
    "tool",
    "log",
    "embed",
    "retriever",
    "chat",
    "convo",
    "message",
    "thread",
}


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\0" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(v) for v in value)
    return False


def lunary_problems(event: Any) -> list[str]:
    if not isinstance(event, dict):
        return ["event is not an object"]
    problems = []
    if event.get("type") not in LUNARY_TYPES:
        problems.append(f"bad type {event.get('type')!r}")
    if event.get("event") not in ("start", "end", "error"):
        problems.append(f"bad event {event.get('event')!r}")
    try:
        uuid.UUID(str(event.get("runId")))
        assert len(str(event.get("runId"))) == 36
    except (ValueError, AssertionError):
        problems.append("runId must be a UUID")
    try:
        datetime.fromisoformat(str(event.get("timestamp")).replace("Z", "+00:00"))
    except ValueError:
        problems.append("timestamp must be ISO 8601")
    if event.get("event") == "start":
        if not isinstance(event.get("name"), str):
            problems.append("start needs a name")
        if "input" not in event:
            problems.append("start needs input")
    if event.get("event") == "end":
        if "output" not in event:
            problems.append("end needs output")
        usage = event.get("tokensUsage")
        if usage is not None and not (
            isinstance(usage, dict)
            and _is_int(usage.get("prompt"))
            and _is_int(usage.get("completion"))
        ):
            problems.append("tokensUsage must be {prompt, completion}")
    if event.get("event") == "error":
        error = event.get("error")
        if not (isinstance(error, dict) and isinstance(error.get("message"), str)):
            problems.append("error needs error.message")
    return problems


class FakeLunary:
    def __init__(self, max_body: int = 20 * 1024 * 1024) -> None:
        self.runs: dict[str, dict[str, Any]] = {}
        self.received: list[dict[str, Any]] = []
        self.bodies: list[int] = []  # the size of every request body taken
        self.max_body = max_body  # koa-bodyparser's jsonLimit in Lunary: "20mb"
        self.answers: list[int] = []
        self.answer_headers: dict[str, str] = {}
        self.seen: list[float] = []
        self.refuse_run: set[str] = set()
        self.run_error = "invalid input"  # the error of each run in refuse_run
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_post("/v1/runs/ingest", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(time.monotonic())
        authorization = request.headers.get("Authorization", "")
        if authorization != f"Bearer {LUNARY_KEY}":
            try:
                uuid.UUID(authorization.removeprefix("Bearer "))
            except ValueError:
                # Lunary looks the bearer up as the project id, a UUID column.
                return web.json_response({"message": "Incorrect project id format"}, status=402)
            return web.json_response({"message": "This project does not exist"}, status=401)
        if self.answers:
            echo = f"scripted; got Authorization: {authorization}"
            return web.json_response(
                {"message": echo}, status=self.answers.pop(0), headers=self.answer_headers
            )
        raw = await request.read()
        if len(raw) > self.max_body:
            return web.json_response({"message": "request entity too large"}, status=413)
        self.bodies.append(len(raw))
        body = await request.json()
        events = body.get("events") if isinstance(body, dict) else None
        if events is None:
            return web.json_response({"message": "Missing events payload."}, status=400)
        events = events if isinstance(events, list) else [events]
        problems = [p for e in events for p in lunary_problems(e)]
        if problems:
            return web.json_response({"message": problems}, status=400)
        results = []
        for event in sorted(
            events, key=lambda e: datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00"))
        ):
            run = event["runId"]
            self.received.append(event)
            if run in self.refuse_run:
                results.append({"id": run, "success": False, "error": self.run_error})
            elif _holds_nul(event):
                # Lunary stores runs in PostgreSQL, whose text and jsonb hold no NUL: the insert
                # (or update) of this run fails, and the run is answered as failed.
                results.append(
                    {"id": run, "success": False, "error": "unsupported Unicode escape sequence"}
                )
            elif event["event"] == "start" and run in self.runs:
                results.append(
                    {
                        "id": run,
                        "success": False,
                        "error": "Run with this ID already exists in the database.",
                    }
                )
            elif event["event"] == "start":
                self.runs[run] = {"start": event}
                results.append({"id": run, "success": True})
            else:
                self.runs.setdefault(run, {})[event["event"]] = event
                results.append({"id": run, "success": True})
        return web.json_response({"results": results})
