from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
from aiobotocore.session import get_session
from aiohttp import web
from aiohttp.test_utils import TestServer
from botocore.exceptions import ClientError
from click.testing import CliRunner
from moto.server import ThreadedMotoServer
from prometheus_client import REGISTRY

from dispatcher.backends import Rejection
from dispatcher.backends.cloudwatch import (
    EVENT_OVERHEAD,
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    MAX_SPAN_MS,
    CloudWatchBackend,
    batches,
    message,
)
from dispatcher.backends.cloudwatch import _auth_refusal as auth_refusal
from dispatcher.cli import dispatcher_command
from dispatcher.exit_codes import Exit
from dispatcher.handback import RedisHandback
from dispatcher.retry import Backoff
from dispatcher.worker import AuthFailed, BackendStartError, Worker, WorkerSettings
from llm_proxy.events.builder import build
from llm_proxy.events.event import Event
from llm_proxy.events.memory import MemoryBus
from llm_proxy.events.redis import RedisBus
from tests.dispatcher.aws import CREDENTIALS, moto_auth, read_stored, stored
from tests.events.events_support import RedisServer, exchange
from tests.processes import free_port

DAY = 24 * 3600
CREDENTIALS_ENV = {
    "AWS_ACCESS_KEY_ID": CREDENTIALS["aws_access_key_id"],
    "AWS_SECRET_ACCESS_KEY": CREDENTIALS["aws_secret_access_key"],
}


@pytest.fixture
async def logs(moto_url: str) -> AsyncIterator[Any]:
    async with get_session().create_client(
        "logs", region_name="us-east-1", endpoint_url=moto_url, **CREDENTIALS
    ) as client:
        yield client


def backend(moto_url: str, **options: Any) -> CloudWatchBackend:
    return CloudWatchBackend(
        "llm-proxy",
        "events",
        region="us-east-1",
        endpoint_url=moto_url,
        **{**CREDENTIALS, **options},
    )


def event_at(epoch: float, n: int = 0) -> Event:
    return build(exchange(request={"model": "gpt-4o", "n": n}, response=b"{}", started_at=epoch))


async def test_creates_group_and_stream_and_writes_events_in_time_order(
    moto_url: str, logs: Any, tmp_path: Path
) -> None:
    now = time.time()
    events = [event_at(now - 30, 1), event_at(now - 90, 0), event_at(now - 10, 2)]
    bus = MemoryBus()
    worker = Worker(
        bus,
        backend(moto_url),
        WorkerSettings(
            service="cloudwatch",
            dead_letter_path=tmp_path / "dead.jsonl",
            poll=0.05,
            batch_wait=0.05,
            burst=True,
        ),
    )
    worker.start()
    await bus.publish(events)
    summary = await worker.async_run()

    assert summary.delivered == 3
    assert [e["request"]["n"] for e in await stored(logs)] == [0, 1, 2]
    groups = await logs.describe_log_groups()
    assert [g["logGroupName"] for g in groups["logGroups"]] == ["llm-proxy"]


async def test_events_too_old_or_too_new_are_dead_lettered_and_counted(
    moto_url: str, logs: Any, tmp_path: Path
) -> None:
    too_old = (
        REGISTRY.get_sample_value(
            "llm_proxy_dispatcher_cloudwatch_rejected_total", {"kind": "too_old"}
        )
        or 0.0
    )
    now = time.time()
    events = [event_at(now - 15 * DAY), event_at(now), event_at(now + 3 * 3600)]
    bus = MemoryBus()
    worker = Worker(
        bus,
        backend(moto_url),
        WorkerSettings(
            service="cloudwatch",
            dead_letter_path=tmp_path / "dead.jsonl",
            poll=0.05,
            batch_wait=0.05,
            burst=True,
        ),
    )
    worker.start()
    await bus.publish(events)
    summary = await worker.async_run()

    assert summary.delivered == 1 and summary.dead_lettered == 2
    assert [e["id"] for e in await stored(logs)] == [events[1]["id"]]
    dead = [orjson.loads(line) for line in (tmp_path / "dead.jsonl").read_bytes().splitlines()]
    assert sorted(d["reason"] for d in dead) == [
        "cloudwatch rejects events more than 2 hours in the future",
        "cloudwatch rejects events older than 14 days",
    ]
    assert (
        REGISTRY.get_sample_value(
            "llm_proxy_dispatcher_cloudwatch_rejected_total", {"kind": "too_old"}
        )
        == too_old + 1
    )


async def test_events_just_inside_the_age_limits_are_sent_not_refused(
    moto_url: str, logs: Any, tmp_path: Path
) -> None:
    # Within 14 days and 2 hours of now by half a minute: CloudWatch takes them (moto checks
    # those limits as AWS does), so nothing may be dead-lettered for our clock's sake.
    now = time.time()
    events = [event_at(now - 14 * DAY + 30), event_at(now + 2 * 3600 - 30)]
    summary = await deliver_burst(backend(moto_url), events, tmp_path)
    assert summary.delivered == 2 and summary.dead_lettered == 0
    assert [e["id"] for e in await stored(logs)] == [e["id"] for e in events]


def burst_worker(
    cloudwatch: CloudWatchBackend, tmp_path: Path, backoff: Backoff | None = None
) -> tuple[MemoryBus, Worker]:
    """A burst-mode worker delivering a memory bus's events to ``cloudwatch``."""
    bus = MemoryBus()
    settings = WorkerSettings(
        service="cloudwatch",
        dead_letter_path=tmp_path / "dead.jsonl",
        poll=0.05,
        batch_wait=0.05,
        burst=True,
    )
    return bus, Worker(
        bus, cloudwatch, settings if backoff is None else replace(settings, backoff=backoff)
    )


async def deliver_burst(cloudwatch: CloudWatchBackend, events: list[Event], tmp_path: Path) -> Any:
    bus, worker = burst_worker(cloudwatch, tmp_path)
    worker.start()
    await bus.publish(events)
    return await worker.async_run()


async def test_an_endpoint_unreachable_at_start_is_retried_like_a_delivery(
    tmp_path: Path,
) -> None:
    # A dispatcher may start before its network, or while the endpoint restarts: it must wait
    # for CloudWatch as it does when a put fails, not exit.
    port = free_port()
    group = f"unreachable-{uuid.uuid4().hex}"  # moto's state is the process's: a group of its own
    cloudwatch = CloudWatchBackend(
        group, "events", region="us-east-1", endpoint_url=f"http://127.0.0.1:{port}", **CREDENTIALS
    )
    bus, worker = burst_worker(cloudwatch, tmp_path, Backoff(base=0.2, cap=0.5))
    await worker.open()
    worker.start()
    sent = [event_at(time.time() - 1, n) for n in range(2)]
    await bus.publish(sent)
    await asyncio.sleep(0.5)  # a put fails meanwhile
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        summary = await asyncio.wait_for(worker.async_run(), 30)
        async with get_session().create_client(
            "logs", region_name="us-east-1", endpoint_url=f"http://127.0.0.1:{port}", **CREDENTIALS
        ) as logs:
            assert [e["id"] for e in await stored(logs, group)] == [e["id"] for e in sent]
    finally:
        server.stop()
    assert summary.delivered == 2 and summary.dead_lettered == 0


def throttling_endpoint(
    throttled: int, stored_messages: list[str], code: str = "ThrottlingException"
) -> web.Application:
    """A CloudWatch Logs endpoint that refuses its first ``throttled`` Create calls with
    ``code``, as AWS throttles CreateLogGroup when many dispatchers start at once; puts to a
    stream not created yet are refused as AWS refuses them."""
    created: set[str] = set()
    left = [throttled]

    def error(code: str, message: str) -> web.Response:
        body = {"__type": code, "message": message}
        return web.json_response(body, status=400, content_type="application/x-amz-json-1.1")

    async def answer(request: web.Request) -> web.Response:
        action = request.headers.get("X-Amz-Target", "").rpartition(".")[2]
        if action.startswith("Create"):
            if left[0] > 0:
                left[0] -= 1
                return error(code, "Rate exceeded" if "Throttl" in code else "In conflict")
            created.add(action)
        elif action == "PutLogEvents":
            if created != {"CreateLogGroup", "CreateLogStream"}:
                return error("ResourceNotFoundException", "The specified log group does not exist.")
            body = orjson.loads(await request.read())
            stored_messages.extend(e["message"] for e in body["logEvents"])
        return web.json_response({}, content_type="application/x-amz-json-1.1")

    app = web.Application()
    app.router.add_post("/", answer)
    return app


@pytest.mark.parametrize(
    "code",
    [
        "ThrottlingException",
        # Another replica creating the same group or stream at the same moment.
        "OperationAbortedException",
    ],
)
async def test_a_start_throttled_by_aws_is_retried_like_a_delivery(
    code: str, aiohttp_server: Any, tmp_path: Path
) -> None:
    stored_messages: list[str] = []
    # Six: more than botocore tries by itself.
    server = await aiohttp_server(throttling_endpoint(6, stored_messages, code))
    cloudwatch = CloudWatchBackend(
        "llm-proxy",
        "events",
        region="us-east-1",
        endpoint_url=str(server.make_url("")).rstrip("/"),
        **CREDENTIALS,
    )
    bus, worker = burst_worker(cloudwatch, tmp_path, Backoff(base=0.05, cap=0.2))
    await worker.open()
    worker.start()
    sent = [event_at(time.time() - 1, n) for n in range(2)]
    await bus.publish(sent)
    summary = await asyncio.wait_for(worker.async_run(), 30)
    assert summary.delivered == 2 and summary.dead_lettered == 0
    assert [orjson.loads(m)["id"] for m in stored_messages] == [e["id"] for e in sent]


async def test_a_deleted_stream_is_recreated(moto_url: str, logs: Any) -> None:
    cloudwatch = backend(moto_url)
    await cloudwatch.start()
    try:
        await logs.delete_log_group(logGroupName="llm-proxy")
        assert await cloudwatch.send([event_at(time.time())]) == {}
        assert len(await stored(logs)) == 1
    finally:
        await cloudwatch.close()


async def test_service_errors_are_classified(moto_url: str) -> None:
    cloudwatch = backend(moto_url)
    await cloudwatch.start()
    try:
        cloudwatch.log_group = "g" * 600  # longer than CloudWatch allows: refused for good
        refused = await cloudwatch.send([event_at(time.time())])
        assert not refused[0].retryable
    finally:
        await cloudwatch.close()


def test_rejected_log_events_info_maps_back_to_events() -> None:
    cloudwatch = CloudWatchBackend("g", "s", region="us-east-1")
    batch = [(i, 10 + i, "m") for i in range(6)]
    refused = cloudwatch._partial(
        batch,
        {"tooOldLogEventEndIndex": 1, "expiredLogEventEndIndex": 2, "tooNewLogEventStartIndex": 5},
    )
    assert sorted(refused) == [10, 11, 15]
    assert not any(r.retryable for r in refused.values())


def test_batches_respect_count_bytes_and_span() -> None:
    many = [(i, i, "x") for i in range(MAX_BATCH_EVENTS + 5)]
    assert [len(b) for b in batches(many)] == [MAX_BATCH_EVENTS, 5]

    big = "y" * (MAX_BATCH_BYTES // 4)
    sized = list(batches([(i, i, big) for i in range(5)]))
    assert [len(b) for b in sized] == [3, 2]
    assert all(
        sum(len(m.encode()) + EVENT_OVERHEAD for _, _, m in b) <= MAX_BATCH_BYTES for b in sized
    )

    spread = [(0, 0, "a"), (MAX_SPAN_MS, 1, "b"), (MAX_SPAN_MS + 1, 2, "c")]
    assert [len(b) for b in batches(spread)] == [2, 1]


def test_oversized_messages_are_cut_to_fit() -> None:
    huge = build(
        exchange(
            request={"model": "gpt-4o", "messages": [{"role": "user", "content": 'z"' * 400_000}]},
            response=b"{}",
            request_limit=4 << 20,
        )
    )
    text = message(huge, 256 * 1024)
    assert len(text.encode()) <= 256 * 1024
    cut = orjson.loads(text)
    assert cut["id"] == huge["id"] and cut["request"].endswith("…[truncated by llm-proxy]")
    assert cut["response"] == {}
    small_text = message(huge, 2000)
    assert len(small_text.encode()) <= 2000
    assert orjson.loads(small_text)["request"].endswith("…[truncated by llm-proxy]")
    tiny = orjson.loads(message(huge, 100))  # smaller than the event without bodies: bodies go
    assert tiny["request"] == tiny["response"] == "…[truncated by llm-proxy]"
    small = event_at(time.time())
    assert message(small, 256 * 1024) == orjson.dumps(small).decode()


def test_backoff_grows_and_is_capped() -> None:
    backoff = Backoff(base=1.0, cap=8.0)
    for attempt, ceiling in ((1, 1.0), (2, 2.0), (4, 8.0), (40, 8.0)):
        delays = [backoff.delay(attempt) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)


# -- refused credentials ----------------------------------------------------------------------

WRONG_SECRET = "wrong-secret-not-for-logs"


ACCESS_KEY_ID = "AKIAECHOEDBYTHEFAKE7"
SECRET_ACCESS_KEY = "echoed/secret+access/key0123456789abcdefgh"


def echoing_endpoint(refuse: str) -> web.Application:
    """A CloudWatch Logs endpoint that refuses ``refuse`` (an X-Amz-Target's action) with a
    message quoting what it was sent, as the audit's fake did: the signed Authorization."""

    async def answer(request: web.Request) -> web.Response:
        action = request.headers.get("X-Amz-Target", "").rpartition(".")[2]
        if action == refuse:
            error = {
                "__type": "InvalidParameterException",
                "message": f"bad request signed with {request.headers.get('Authorization')}"
                f" and {SECRET_ACCESS_KEY}",
            }
        elif action.startswith("Create"):
            error = {"__type": "ResourceAlreadyExistsException", "message": "exists"}
        else:
            return web.json_response({}, content_type="application/x-amz-json-1.1")
        return web.json_response(error, status=400, content_type="application/x-amz-json-1.1")

    app = web.Application()
    app.router.add_post("/", answer)
    return app


def echoed_backend(server: TestServer) -> CloudWatchBackend:
    return CloudWatchBackend(
        "llm-proxy",
        "events",
        region="us-east-1",
        endpoint_url=str(server.make_url("")).rstrip("/"),
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
    )


def assert_no_credentials(text: str) -> None:
    assert ACCESS_KEY_ID not in text and SECRET_ACCESS_KEY not in text
    assert re.search(r"Signature=[0-9a-f]{8}", text) is None, text


async def test_credentials_echoed_in_a_refusal_are_masked_in_logs_and_dead_letters(
    aiohttp_server: Any, tmp_path: Path, log_stream: io.StringIO
) -> None:
    server = await aiohttp_server(echoing_endpoint("PutLogEvents"))
    settings = WorkerSettings(
        service="cloudwatch", dead_letter_path=tmp_path / "dead.jsonl", poll=0.05, burst=True
    )
    bus = MemoryBus()
    worker = Worker(bus, echoed_backend(server), settings)
    worker.start()
    await bus.publish([event_at(time.time())])
    summary = await asyncio.wait_for(worker.async_run(), 20)
    assert summary.dead_lettered == 1
    [line] = [orjson.loads(text) for text in (tmp_path / "dead.jsonl").read_bytes().splitlines()]
    assert line["reason"].startswith("InvalidParameterException: bad request signed with")
    assert "Credential=AK…AKE7/" in line["reason"] and "Signature=…" in line["reason"]
    assert "dispatcher.dead_lettered" in log_stream.getvalue()
    assert_no_credentials((tmp_path / "dead.jsonl").read_text() + log_stream.getvalue())


async def test_credentials_echoed_when_starting_are_masked(aiohttp_server: Any) -> None:
    server = await aiohttp_server(echoing_endpoint("CreateLogGroup"))
    worker = Worker(
        MemoryBus(),
        echoed_backend(server),
        WorkerSettings(service="cloudwatch", dead_letter_path=Path("unused")),
    )
    with pytest.raises(BackendStartError) as caught:
        await worker.async_run()
    assert "InvalidParameterException" in str(caught.value)
    assert_no_credentials(str(caught.value))


def test_aws_authentication_errors_are_recognised_by_code_or_status() -> None:
    def error(code: str, status: int) -> ClientError:
        body = {"Error": {"Code": code, "Message": "key AKIA… refused"}}
        return ClientError({**body, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutLogEvents")

    for code in ("UnrecognizedClientException", "InvalidSignatureException", "ExpiredToken"):
        refused = auth_refusal(error(code, 400))
        assert refused == Rejection(f"{code} (HTTP 400)", retryable=False, auth=True)
    assert auth_refusal(error("AccessDeniedException", 400)) is not None
    assert auth_refusal(error("403", 403)) is not None  # what moto answers
    assert auth_refusal(error("InvalidParameterException", 400)) is None
    assert auth_refusal(error("ThrottlingException", 400)) is None


@pytest.mark.redis
def test_wrong_aws_credentials_stop_the_dispatcher_at_start_and_leave_the_events(
    moto_url: str, keys: list[dict[str, str]], redis_server: RedisServer, tmp_path: Path
) -> None:
    sent = [event_at(time.time() - 5, n) for n in range(4)]
    publish(redis_server.url, "cw:events", sent)

    def dispatcher(secret: str) -> Any:
        return CliRunner().invoke(
            dispatcher_command,
            [
                "--service",
                "cloudwatch",
                "--region",
                "us-east-1",
                "--endpoint-url",
                moto_url,
                "--stream",
                "cw:events",
                "--burst",
                "--batch-wait",
                "0.05",
            ],
            env={
                "REDIS_URL": redis_server.url,
                "DATA_DIR": str(tmp_path),
                "AWS_ACCESS_KEY_ID": keys[0]["aws_access_key_id"],
                "AWS_SECRET_ACCESS_KEY": secret,
            },
            catch_exceptions=False,
        )

    with structlog.testing.capture_logs() as logs:
        refused = dispatcher(WRONG_SECRET)
    assert refused.exit_code == 5
    [line] = [entry for entry in logs if entry["log_level"] == "error"]
    assert line["event"] == "dispatcher.auth_failed" and line["service"] == "cloudwatch"
    assert line["status"] == "403 (HTTP 403)" and "AWS_ACCESS_KEY_ID" in line["action"]
    assert WRONG_SECRET not in refused.output + repr(logs)
    assert not list(tmp_path.glob("dead-letter-*"))

    accepted = dispatcher(keys[0]["aws_secret_access_key"])
    assert accepted.exit_code == 0, accepted.output
    moto_auth(moto_url, "inf")
    assert sorted(e["id"] for e in asyncio.run(read_stored(moto_url))) == sorted(
        e["id"] for e in sent
    )


@pytest.mark.redis
async def test_credentials_revoked_while_running_stop_the_worker_without_dead_letters(
    moto_url: str, keys: list[dict[str, str]], redis_server: RedisServer, tmp_path: Path
) -> None:
    bus = RedisBus(redis_server.url, stream="revoked:events")
    worker_settings = WorkerSettings(
        service="cloudwatch",
        dead_letter_path=tmp_path / "dead.jsonl",
        poll=0.05,
        batch_wait=0.05,
    )
    first = Worker(
        bus,
        backend(moto_url, **keys[0]),
        worker_settings,
        handback=RedisHandback(bus.client, "revoked:events"),
    )
    serving = asyncio.create_task(first.serve())
    before = [event_at(time.time() - 5, n) for n in range(2)]
    await bus.publish(before)
    for _ in range(200):
        if first.summary.delivered == 2:
            break
        await asyncio.sleep(0.05)
    assert first.summary.delivered == 2

    async with get_session().create_client(
        "iam", region_name="us-east-1", endpoint_url=moto_url, **keys[1]
    ) as iam:
        await iam.delete_access_key(UserName="dispatcher", AccessKeyId=keys[0]["aws_access_key_id"])
    after = [event_at(time.time() - 1, n) for n in range(2, 5)]
    await bus.publish(after)
    assert await asyncio.wait_for(serving, 10) == Exit.AUTH
    assert (await bus.client.xpending("revoked:events", "cloudwatch"))["pending"] == 3
    assert not (tmp_path / "dead.jsonl").exists()

    second = Worker(
        bus, backend(moto_url, **keys[1]), dataclasses.replace(worker_settings, burst=True)
    )
    assert await asyncio.wait_for(second.serve(), 10) == Exit.OK
    await bus.close()
    moto_auth(moto_url, "inf")
    stored_ids = sorted(e["id"] for e in await read_stored(moto_url))
    assert stored_ids == sorted(e["id"] for e in before + after)


def publish(url: str, stream: str, events: list[Event]) -> None:
    async def go() -> None:
        bus = RedisBus(url, stream=stream)
        await bus.publish(events)
        await bus.close()

    asyncio.run(go())


def test_no_aws_credentials_at_all_stop_the_dispatcher_with_exit_5(
    moto_url: str, tmp_path: Path
) -> None:
    nowhere = str(tmp_path / "none")
    unset = {
        name: None
        for name in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
        )
    }
    with structlog.testing.capture_logs() as logs:
        result = CliRunner().invoke(
            dispatcher_command,
            ["--service", "cloudwatch", "--region", "us-east-1", "--endpoint-url", moto_url],
            env={
                **unset,
                "AWS_SHARED_CREDENTIALS_FILE": nowhere,
                "AWS_CONFIG_FILE": nowhere,
                "AWS_EC2_METADATA_DISABLED": "true",  # no instance role to ask on this machine
                "REDIS_URL": "redis://127.0.0.1:9/0",  # never reached: the backend fails first
            },
            catch_exceptions=False,
        )
    assert result.exit_code == 5
    [line] = [entry for entry in logs if entry["log_level"] == "error"]
    assert line["status"] == "no AWS credentials found"


@pytest.mark.redis
@pytest.mark.parametrize("where", ["AWS_DEFAULT_REGION", "profile"])
def test_the_region_comes_from_the_usual_aws_configuration_too(
    where: str, moto_url: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    # boto3, the AWS CLI and botocore take the region from AWS_DEFAULT_REGION or the profile's
    # config file, not AWS_REGION alone: a dispatcher set up like them must not need --region.
    config = tmp_path / "aws-config"
    config.write_text("[default]\nregion = us-east-1\n")
    where_env = (
        {"AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(tmp_path / "none")}
        if where == "AWS_DEFAULT_REGION"
        else {"AWS_DEFAULT_REGION": None, "AWS_CONFIG_FILE": str(config)}
    )
    sent = [event_at(time.time() - 5, n) for n in range(2)]
    publish(redis_server.url, "region:events", sent)
    result = CliRunner().invoke(
        dispatcher_command,
        [
            "--service",
            "cloudwatch",
            "--endpoint-url",
            moto_url,
            "--stream",
            "region:events",
            "--burst",
            "--batch-wait",
            "0.05",
        ],
        env={
            "AWS_REGION": None,
            "AWS_PROFILE": None,
            **where_env,
            **CREDENTIALS_ENV,
            "REDIS_URL": redis_server.url,
            "DATA_DIR": str(tmp_path),
        },
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    stored_ids = sorted(e["id"] for e in asyncio.run(read_stored(moto_url)))
    assert stored_ids == sorted(e["id"] for e in sent)


@pytest.mark.redis
def test_with_log_format_json_every_line_of_a_dispatcher_is_json(
    moto_url: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    # botocore logs through the standard library ("Found credentials in environment variables",
    # at every start): a shipper that parses JSON lines must get those as JSON too.
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        **CREDENTIALS_ENV,
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "info",
        "REDIS_URL": redis_server.url,
        "DATA_DIR": str(tmp_path),
    }
    done = subprocess.run(
        [
            *(sys.executable, "-m", "llm_proxy", "dispatcher", "--service", "cloudwatch"),
            *("--region", "us-east-1", "--endpoint-url", moto_url, "--burst"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    entries = [json.loads(line) for line in done.stderr.splitlines()]
    assert "Found credentials in environment variables." in [e["event"] for e in entries]
    assert {"dispatcher.started", "dispatcher.stopped"} <= {e["event"] for e in entries}


# -- the size of one event, as CloudWatch counts it -------------------------------------------


def sizing_endpoint(stored_messages: list[str]) -> web.Application:
    """A CloudWatch Logs endpoint that counts an event's size as AWS does, its message bytes plus
    26, and refuses a request with one event over 256 KiB (what AWS answers for it)."""

    async def answer(request: web.Request) -> web.Response:
        action = request.headers.get("X-Amz-Target", "").rpartition(".")[2]
        if action != "PutLogEvents":
            return web.json_response({}, content_type="application/x-amz-json-1.1")
        body = orjson.loads(await request.read())
        for event in body["logEvents"]:
            size = len(event["message"].encode()) + EVENT_OVERHEAD
            if size > 256 * 1024:
                error = {
                    "__type": "InvalidParameterException",
                    "message": f"Log event too large: {size} bytes exceeds limit of 262144",
                }
                return web.json_response(
                    error, status=400, content_type="application/x-amz-json-1.1"
                )
        stored_messages.extend(event["message"] for event in body["logEvents"])
        return web.json_response({}, content_type="application/x-amz-json-1.1")

    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_post("/", answer)
    return app


def event_of_size(size: int, epoch: float) -> Event:
    """An event whose JSON is ``size`` bytes, most of them its answer's text."""
    event = event_at(epoch)
    event["response"] = ""
    event["response"] = "r" * (size - len(orjson.dumps(event)))
    assert len(orjson.dumps(event)) == size
    return event


async def deliver_to_sizing_endpoint(
    aiohttp_server: Any, tmp_path: Path, sent: list[Event]
) -> tuple[Any, list[str]]:
    """Deliver ``sent`` through a worker to :func:`sizing_endpoint`: its summary and the messages
    stored."""
    stored_messages: list[str] = []
    server = await aiohttp_server(sizing_endpoint(stored_messages))
    bus = MemoryBus()
    worker = Worker(
        bus,
        CloudWatchBackend(
            "llm-proxy",
            "events",
            region="us-east-1",
            endpoint_url=str(server.make_url("")).rstrip("/"),
            **CREDENTIALS,
        ),
        WorkerSettings(
            service="cloudwatch", dead_letter_path=tmp_path / "dead.jsonl", poll=0.05, burst=True
        ),
    )
    worker.start()
    await bus.publish(sent)
    return await asyncio.wait_for(worker.async_run(), 20), stored_messages


async def test_an_event_just_under_256_kib_does_not_cost_its_batch(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    now = time.time()
    sent = [event_at(now - 2, 1), event_of_size(256 * 1024 - 10, now - 1), event_at(now, 2)]
    summary, stored_messages = await deliver_to_sizing_endpoint(aiohttp_server, tmp_path, sent)
    assert summary.dead_lettered == 0 and summary.delivered == 3
    assert [orjson.loads(m)["id"] for m in stored_messages] == [e["id"] for e in sent]
    assert orjson.loads(stored_messages[1])["response"].endswith("…[truncated by llm-proxy]")


async def test_a_model_name_longer_than_an_event_may_be_does_not_cost_its_batch(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    now = time.time()
    # A client may name any model: the upstream refuses it, the event still records it.
    made_up = build(
        exchange(
            request={"model": "m" * 262_000},  # within the proxy's 256 KiB capture
            response=b'{"error": {"code": "model_not_found"}}',
            status=404,
            started_at=now - 1,
        )
    )
    assert made_up["model"] == "m" * 262_000
    sent = [event_at(now - 2, 1), made_up, event_at(now, 2)]
    summary, stored_messages = await deliver_to_sizing_endpoint(aiohttp_server, tmp_path, sent)
    assert summary.dead_lettered == 0 and summary.delivered == 3
    assert [orjson.loads(m)["id"] for m in stored_messages] == [e["id"] for e in sent]
    assert orjson.loads(stored_messages[1])["model"].endswith("…[truncated by llm-proxy]")


# -- least privilege --------------------------------------------------------------------------


async def put_only_keys(
    moto_url: str, actions: tuple[str, ...] = ("logs:PutLogEvents",)
) -> dict[str, str]:
    """An access key of a user that may only put events (the group and stream are made by the
    operator's infrastructure code, as least privilege has it), or do ``actions``."""
    async with get_session().create_client(
        "iam", region_name="us-east-1", endpoint_url=moto_url, **CREDENTIALS
    ) as iam:
        await iam.create_user(UserName="writer")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": list(actions), "Resource": "*"}],
        }
        await iam.put_user_policy(
            UserName="writer", PolicyName="put", PolicyDocument=orjson.dumps(policy).decode()
        )
        created = await iam.create_access_key(UserName="writer")
    return {
        "aws_access_key_id": created["AccessKey"]["AccessKeyId"],
        "aws_secret_access_key": created["AccessKey"]["SecretAccessKey"],
    }


async def _burst_with_put_only_key(moto_url: str, tmp_path: Path, events: list[Event]) -> Any:
    """A burst run of a CloudWatch worker whose key may only PutLogEvents, with moto enforcing
    IAM; what the run returns (or raises)."""
    key = await put_only_keys(moto_url)
    bus = MemoryBus()
    worker = Worker(
        bus,
        backend(moto_url, **key),
        WorkerSettings(
            service="cloudwatch", dead_letter_path=tmp_path / "dead.jsonl", poll=0.05, burst=True
        ),
    )
    moto_auth(moto_url, "0")
    try:
        worker.start()
        await bus.publish(events)
        return await asyncio.wait_for(worker.async_run(), 20)
    finally:
        moto_auth(moto_url, "inf")


async def test_a_key_that_may_only_put_events_delivers_to_an_existing_stream(
    moto_url: str, logs: Any, tmp_path: Path
) -> None:
    await logs.create_log_group(logGroupName="llm-proxy")
    await logs.create_log_stream(logGroupName="llm-proxy", logStreamName="events")
    sent = [event_at(time.time() - 1, n) for n in range(3)]
    summary = await _burst_with_put_only_key(moto_url, tmp_path, sent)
    assert summary.delivered == 3 and not (tmp_path / "dead.jsonl").exists()
    assert [e["id"] for e in await stored(logs)] == [e["id"] for e in sent]


async def test_a_key_that_may_only_put_events_stops_when_the_stream_is_missing(
    moto_url: str, logs: Any, tmp_path: Path
) -> None:
    await logs.create_log_group(logGroupName="llm-proxy")  # and no stream
    with pytest.raises(AuthFailed):
        await _burst_with_put_only_key(moto_url, tmp_path, [event_at(time.time() - 1)])


async def test_a_key_that_may_create_streams_only_recreates_a_deleted_stream(
    moto_url: str, logs: Any
) -> None:
    # The policy log shippers are given (CreateLogStream and PutLogEvents in a group made
    # beforehand): a stream deleted under the dispatcher is one it may make again.
    await logs.create_log_group(logGroupName="llm-proxy")
    key = await put_only_keys(moto_url, ("logs:CreateLogStream", "logs:PutLogEvents"))
    cloudwatch = backend(moto_url, **key)
    first, second = event_at(time.time() - 2, 1), event_at(time.time() - 1, 2)
    moto_auth(moto_url, "0")
    try:
        await cloudwatch.start()
        assert await cloudwatch.send([first]) == {}
        moto_auth(moto_url, "inf")
        await logs.delete_log_stream(logGroupName="llm-proxy", logStreamName="events")
        moto_auth(moto_url, "0")
        assert await cloudwatch.send([second]) == {}
    finally:
        moto_auth(moto_url, "inf")
        await cloudwatch.close()
    assert [e["id"] for e in await stored(logs)] == [second["id"]]
