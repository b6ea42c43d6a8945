from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from dispatcher import health
from dispatcher.cli import dispatcher_command
from llm_proxy.events.builder import build
from llm_proxy.events.redis import RedisBus
from tests.events.events_support import RedisServer, exchange

CLEAN_ENV = {
    name: None
    for name in (
        "LLM_PROXY_DISPATCHER_SERVICE",
        "LLM_PROXY_EVENT_BUS",
        "REDIS_URL",
        "HELICONE_API_KEY",
        "AWS_REGION",
        "LUNARY_PUBLIC_KEY",
        "LLM_PROXY_EVENT_LOG",
        "DATA_DIR",
    )
}


def invoke(*args: str, **env: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        dispatcher_command, list(args), env={**CLEAN_ENV, **env}, catch_exceptions=False
    )
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ((), {}, "--service is required"),
        (("--service", "file"), {"LLM_PROXY_EVENT_BUS": "memory"}, "needs the redis bus"),
        (("--service", "helicone"), {}, "needs --helicone-api-key"),
        (("--service", "cloudwatch"), {}, "needs --region"),
        (("--service", "lunary"), {}, "needs --lunary-public-key"),
        (("--service", "kafka"), {}, "Invalid value for '--service'"),
    ],
)
def test_bad_invocations_exit_with_one_clear_line(
    args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    code, output = invoke(*args, **env)
    assert code == 2 and message in output


@pytest.mark.redis
def test_burst_file_dispatcher_drains_the_stream_and_exits(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    sent = [build(exchange(request={"n": i}, response=b"{}")) for i in range(30)]

    async def publish() -> None:
        bus = RedisBus(redis_server.url, stream="cli:events")
        await bus.publish(sent)
        await bus.close()

    asyncio.run(publish())
    code, _ = invoke(
        "--service",
        "file",
        "--burst",
        "--batch-wait",
        "0.05",
        "--stream",
        "cli:events",
        REDIS_URL=redis_server.url,
        DATA_DIR=str(tmp_path),
    )
    assert code == 0
    written = [
        orjson.loads(line)["id"] for line in (tmp_path / "events.jsonl").read_bytes().splitlines()
    ]
    assert written == [e["id"] for e in sent]


@pytest.mark.redis
def test_check_reports_a_live_dispatcher(redis_server: RedisServer) -> None:
    code, output = invoke(
        "check", "--service", "file", "--stream", "cli:events", REDIS_URL=redis_server.url
    )
    assert code == 1 and "no live dispatcher for file" in output

    async def beat() -> None:
        bus = RedisBus(redis_server.url)
        await health.RedisHeartbeat(bus.client, "cli:events", "file").beat({"delivered": 5})
        await bus.close()

    asyncio.run(beat())
    code, output = invoke(
        "check", "--service", "file", "--stream", "cli:events", REDIS_URL=redis_server.url
    )
    assert code == 0 and "delivered=5" in output


def test_check_fails_when_redis_is_unreachable() -> None:
    code, _ = invoke("check", "--service", "lunary", REDIS_URL="redis://127.0.0.1:9/0")
    assert code == 1


def test_a_backend_that_cannot_start_exits_1(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _ = invoke(
        "--service",
        "file",
        "--path",
        str(blocker / "events.jsonl"),
        "--burst",
        REDIS_URL="redis://127.0.0.1:9/0",
    )
    assert code == 1
