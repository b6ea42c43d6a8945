from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click
import orjson
import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestServer
from click.testing import CliRunner, Result

from dispatcher import health
from dispatcher.backends.lunary import run_id
from dispatcher.cli import dispatcher_command
from llm_proxy.events.builder import build
from llm_proxy.events.event import Event
from llm_proxy.events.redis import RedisBus
from tests.dispatcher.fakes import HELICONE_KEY, LUNARY_KEY, FakeHelicone, FakeLunary, serving
from tests.events.events_support import RedisServer, exchange, free_port

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]
ROOT = Path(__file__).resolve().parents[2]

CLEAN_ENV = {
    name: None
    for name in (
        "LLM_PROXY_DISPATCHER_SERVICE",
        "LLM_PROXY_EVENT_BUS",
        "LLM_PROXY_EVENT_STREAM",
        "REDIS_URL",
        "HELICONE_API_KEY",
        "HELICONE_URL",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "LUNARY_PUBLIC_KEY",
        "LUNARY_API_URL",
        "LLM_PROXY_EVENT_LOG",
        "DATA_DIR",
        "LLM_PROXY_DISPATCHER_METRICS_PORT",
        "LLM_PROXY_DISPATCHER_METRICS_HOST",
    )
}
SECRET = "hunter2-not-for-logs"


def run(*args: str, **env: str) -> Result:
    return CliRunner().invoke(
        dispatcher_command, list(args), env={**CLEAN_ENV, **env}, catch_exceptions=False
    )


def invoke(*args: str, **env: str) -> tuple[int, str]:
    result = run(*args, **env)
    return result.exit_code, result.output


def events(n: int) -> list[Event]:
    return [build(exchange(request={"model": "gpt-4o", "n": i}, response=b"{}")) for i in range(n)]


def publish(url: str, stream: str, sent: list[Event]) -> None:
    async def go() -> None:
        bus = RedisBus(url, stream=stream)
        await bus.publish(sent)
        await bus.close()

    asyncio.run(go())


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ((), {}, "--service is required"),
        (("--service", "file"), {"LLM_PROXY_EVENT_BUS": "memory"}, "needs the redis bus"),
        (("--service", "helicone"), {}, "needs --helicone-api-key"),
        (("--service", "cloudwatch"), {"AWS_CONFIG_FILE": "/nonexistent"}, "needs --region"),
        (("--service", "lunary"), {}, "needs --lunary-public-key"),
        (("--service", "kafka"), {}, "Invalid value for '--service'"),
        (("--service", "file"), {"REDIS_URL": "127.0.0.1:6379"}, "must start with redis://"),
        (("--service", "file"), {"REDIS_URL": "redis://h:port/0"}, "has a bad port"),
        (("--service", "file"), {"REDIS_URL": f"redis://:{SECRET}@[::1/0"}, "IPv6 address"),
        (
            ("--service", "file"),
            {"REDIS_URL": f"redis://:{SECRET}@127.0.0.1:1/0?sockettimeout=1"},
            "unknown option 'sockettimeout'",
        ),
        (
            ("check", "--service", "file"),
            {"REDIS_URL": f"redis://:{SECRET}@127.0.0.1:1/0?db=first"},
            "Invalid value for 'db'",
        ),
        (("check", "--service", "file"), {"REDIS_URL": f"redis://:{SECRET}@[::1/0"}, "IPv6"),
        (("check", "--service", "file"), {"REDIS_URL": "http://x"}, "must start with redis://"),
        (
            ("--service", "file", "--burst", "--stream", " "),
            {"REDIS_URL": "redis://127.0.0.1:1/0"},
            "Invalid value for '--stream'",
        ),
        (("--service", "file", "--claim-idle", "0"), {}, "Invalid value for '--claim-idle'"),
        (("--service", "file", "--claim-idle", "-5"), {}, "Invalid value for '--claim-idle'"),
        (("--service", "file", "--batch-wait", "-1"), {}, "Invalid value for '--batch-wait'"),
        (("--service", "file", "--drain-timeout", "-1"), {}, "Invalid value for '--drain-timeout'"),
        (("--service", "file", "--backoff-cap", "-1"), {}, "Invalid value for '--backoff-cap'"),
        (("--service", "file", "--backoff-cap", "0"), {}, "Invalid value for '--backoff-cap'"),
        (("check", "--service", "file", "--max-age", "-1"), {}, "Invalid value for '--max-age'"),
        (
            ("--service", "helicone"),
            {"HELICONE_API_KEY": f"{SECRET}\n"},
            "HELICONE_API_KEY holds a control character",
        ),
        (
            ("--service", "lunary"),
            {"LUNARY_PUBLIC_KEY": f"{SECRET}\t"},
            "LUNARY_PUBLIC_KEY holds a control character",
        ),
        (
            ("replay", str(ROOT / "README.md"), "--service", "helicone"),
            {"HELICONE_API_KEY": f"\x1b{SECRET}"},
            "HELICONE_API_KEY holds a control character",
        ),
    ],
)
def test_bad_invocations_exit_with_one_clear_line(
    args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    code, output = invoke(*args, **env)
    assert code == 2 and message in output
    assert SECRET not in output


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize(
    "args",
    [
        ("--claim-idle",),
        ("--batch-wait",),
        ("--backoff-cap",),
        ("--drain-timeout",),
        ("check", "--max-age"),
        ("check", "--max-lag"),
    ],
)
def test_a_duration_that_is_not_a_finite_number_is_a_bad_invocation(
    args: tuple[str, ...], value: str, tmp_path: Path
) -> None:
    # click's FloatRange lets nan and inf through; a dispatcher given --claim-idle nan hung, deaf
    # to SIGTERM, and --claim-idle inf ended in a traceback.
    *command, option = args
    code, output = invoke(
        *command,
        "--service",
        "file",
        *(() if command else ("--burst",)),
        option,
        value,
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        DATA_DIR=str(tmp_path),
    )
    assert code == 2, output
    assert f"Invalid value for '{option}'" in output and "not a finite number" in output


def test_every_option_of_every_dispatcher_command_has_help() -> None:
    def walk(command: click.Command, path: str) -> list[tuple[str, click.Command]]:
        found = [(path, command)]
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                found += walk(sub, f"{path} {name}")
        return found

    commands = walk(dispatcher_command, "dispatcher")
    assert {path for path, _ in commands} == {
        "dispatcher",
        "dispatcher check",
        "dispatcher replay",
    }
    for path, command in commands:
        assert command.help, path
        options = [p for p in command.params if isinstance(p, click.Option)]
        assert options, path
        for option in options:
            assert option.help and len(option.help) > 10, f"{path} {option.opts[0]}"
        code, text = invoke(*path.split()[1:], "--help")
        assert code == 0 and "Exit codes:" in text, path
        # Every option shows in the help with its text; exit codes keep their lines.
        for option in options:
            assert option.opts[0] in text, f"{path} {option.opts[0]}"
        assert "\n    0  " in text and "\n    2  bad invocation" in text, path


@pytest.mark.redis
def test_burst_file_dispatcher_drains_the_stream_and_exits_0(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    sent = events(30)
    publish(redis_server.url, "cli:events", sent)
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


def test_burst_exits_3_naming_redis_when_it_is_unreachable(tmp_path: Path) -> None:
    port = free_port()
    result = run(
        "--service",
        "file",
        "--burst",
        REDIS_URL=f"redis://:{SECRET}@127.0.0.1:{port}/0",
        DATA_DIR=str(tmp_path),
    )
    assert result.exit_code == 3
    assert f"Redis unreachable at 127.0.0.1:{port}: burst run stopped" in result.stderr
    assert SECRET not in result.output


@pytest.mark.redis
def test_burst_exits_4_when_events_were_dead_lettered(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    sent = events(5)
    publish(redis_server.url, "dl:events", sent)
    fake = FakeLunary()
    fake.refuse_run.add(run_id(sent[2]["id"]))
    with serving(fake.app) as url:
        code, _ = invoke(
            "--service",
            "lunary",
            "--lunary-url",
            url,
            "--burst",
            "--batch-wait",
            "0.05",
            "--stream",
            "dl:events",
            REDIS_URL=redis_server.url,
            DATA_DIR=str(tmp_path),
            LUNARY_PUBLIC_KEY=LUNARY_KEY,
        )
    assert code == 4
    [line] = (tmp_path / "dead-letter-lunary.jsonl").read_bytes().splitlines()
    assert orjson.loads(line)["event"]["id"] == sent[2]["id"]
    assert len(fake.runs) == 4


# -- check ------------------------------------------------------------------------------------


@pytest.mark.redis
def test_check_tells_no_dispatcher_from_alive_from_lagging(redis_server: RedisServer) -> None:
    def check(*extra: str) -> Result:
        return run(
            "check",
            "--service",
            "file",
            "--stream",
            "ck:events",
            *extra,
            REDIS_URL=redis_server.url,
        )

    absent = check()
    assert absent.exit_code == 1
    assert absent.stderr == "no dispatcher running for file (no heartbeat on ck:events)\n"

    async def redis_call(method: str, *args: Any, **kwargs: Any) -> None:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        await getattr(client, method)(*args, **kwargs)
        await client.aclose()

    heartbeat = health.heartbeat_key("ck:events", "file")
    asyncio.run(redis_call("set", heartbeat, orjson.dumps({"at": time.time(), "delivered": 5})))
    no_stream_yet = check()
    assert no_stream_yet.exit_code == 0
    assert no_stream_yet.stdout.startswith("dispatcher file alive (")
    assert no_stream_yet.stdout.endswith("s ago): delivered=5\n")

    # Events the dispatcher of this group has not read yet, published a while ago.
    publish(redis_server.url, "ck:events", events(3))
    asyncio.run(redis_call("xgroup_create", "ck:events", "other-service", id="$"))
    assert check().stdout.endswith("s ago): delivered=5\n")  # only another group so far
    asyncio.run(redis_call("xgroup_create", "ck:events", "file", id="0"))
    time.sleep(0.3)

    alive = check()
    assert alive.exit_code == 0
    assert alive.stdout.startswith("dispatcher file alive (")
    assert "delivered=5" in alive.stdout and "backlog 3 waiting, 0 pending" in alive.stdout

    behind = check("--max-lag", "0.1")
    assert behind.exit_code == 1
    assert behind.stderr.startswith("dispatcher file lagging: its oldest undelivered event waited")
    assert "(more than 0.1s); backlog 3 waiting" in behind.stderr

    stale = check("--max-age=0")
    assert stale.exit_code == 1
    assert stale.stderr.startswith("dispatcher file lagging: last heartbeat")


def test_check_takes_what_the_dispatcher_command_was_given_before_it(
    redis_server: RedisServer,
) -> None:
    """`llm-proxy dispatcher --service lunary --redis-url URL check`, the order the running
    command's line suggests, checks that dispatcher on that Redis; a flag of `check`'s own wins."""
    heartbeat = health.heartbeat_key("ck2:events", "lunary")
    client = redis.Redis.from_url(redis_server.url)
    client.set(heartbeat, orjson.dumps({"at": time.time(), "delivered": 2}))
    client.close()
    group = ("--service", "lunary", "--redis-url", redis_server.url, "--stream", "ck2:events")

    alive = run(*group, "check")
    assert alive.exit_code == 0, alive.output
    assert alive.stdout.startswith("dispatcher lunary alive (")

    other = run(*group, "check", "--service", "file")
    assert other.exit_code == 1, other.output
    assert other.stderr == "no dispatcher running for file (no heartbeat on ck2:events)\n"

    unnamed = run("check")
    assert unnamed.exit_code == 2 and "Missing option '--service'" in unnamed.output


def test_check_names_an_unreachable_redis_without_its_password() -> None:
    port = free_port()
    result = run("check", "--service", "lunary", REDIS_URL=f"redis://:{SECRET}@127.0.0.1:{port}/0")
    assert result.exit_code == 3
    assert result.stderr.startswith(f"Redis unreachable at 127.0.0.1:{port}: ")
    assert "no dispatcher" not in result.output and SECRET not in result.output


@pytest.mark.redis
def test_check_says_when_redis_refuses_the_password(redis_server: RedisServer) -> None:
    admin = redis.Redis(port=redis_server.port)
    admin.config_set("requirepass", "the-right-one")
    admin.close()
    result = run(
        "check",
        "--service",
        "file",
        REDIS_URL=f"redis://:{SECRET}@127.0.0.1:{redis_server.port}/0",
    )
    assert result.exit_code == 3
    assert result.stderr.startswith(
        f"Redis at 127.0.0.1:{redis_server.port} refused the credentials in --redis-url"
    )
    assert SECRET not in result.output


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


# -- refused credentials, end to end ----------------------------------------------------------


def dispatcher(log: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    variables = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "dispatcher", *args],
            cwd=ROOT,
            env={**variables, **env},
            stdout=output,
            stderr=subprocess.STDOUT,
        )


async def finished(process: subprocess.Popen[bytes], seconds: float) -> int:
    try:
        return await asyncio.wait_for(asyncio.to_thread(process.wait), seconds)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.redis
async def test_a_wrong_helicone_key_stops_the_dispatcher_and_a_restart_delivers_everything(
    redis_server: RedisServer, aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    fake = FakeHelicone()
    server = await aiohttp_server(fake.app)
    sent = events(12)
    bus = RedisBus(redis_server.url, stream="key:events")
    await bus.publish(sent)
    common = (
        "--service",
        "helicone",
        "--helicone-url",
        str(server.make_url("/custom/v1/log")),
        "--redis-url",
        redis_server.url,
        "--stream",
        "key:events",
        "--data-dir",
        str(tmp_path),
        "--batch-wait",
        "0.05",
    )

    # Not --burst: a long-running dispatcher must stop by itself, not keep going.
    wrong = dispatcher(tmp_path / "wrong.log", *common, HELICONE_API_KEY=SECRET)
    assert await finished(wrong, 30) == 5
    output = (tmp_path / "wrong.log").read_text()
    assert SECRET not in output
    [line] = [text for text in output.splitlines() if "error" in text]
    assert "dispatcher.auth_failed" in line and "service=helicone" in line
    assert "HTTP 401" in line and "unacknowledged=12" in line
    assert "fix --helicone-api-key / HELICONE_API_KEY and restart" in line
    assert not list(tmp_path.glob("dead-letter-*"))
    assert fake.refused_keys <= 8 and not fake.logs
    assert (await bus.client.xpending("key:events", "helicone"))["pending"] == 12

    right = dispatcher(tmp_path / "right.log", *common, "--burst", HELICONE_API_KEY=HELICONE_KEY)
    assert await finished(right, 30) == 0, (tmp_path / "right.log").read_text()
    delivered = [log["providerRequest"]["meta"]["Helicone-Request-Id"] for log in fake.logs]
    assert sorted(delivered) == sorted(e["id"] for e in sent)
    assert (await bus.client.xpending("key:events", "helicone"))["pending"] == 0
    assert not list(tmp_path.glob("dead-letter-*"))
    await bus.close()


# -- a dead-letter file that cannot be written ----------------------------------------------


@pytest.mark.redis
async def test_an_unwritable_dead_letter_file_keeps_the_refused_event_and_the_dispatcher_up(
    redis_server: RedisServer, aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    fake = FakeLunary()
    server = await aiohttp_server(fake.app)
    sent = events(5)
    refused = run_id(sent[2]["id"])
    fake.refuse_run.add(refused)
    bus = RedisBus(redis_server.url, stream="dlw:events")
    await bus.publish(sent)
    blocker = tmp_path / "dead"  # a file where the dead-letter file's directory should be
    blocker.write_text("")
    process = dispatcher(
        tmp_path / "dispatcher.log",
        "--service",
        "lunary",
        "--lunary-url",
        str(server.make_url("")),
        "--redis-url",
        redis_server.url,
        "--stream",
        "dlw:events",
        "--data-dir",
        str(tmp_path),
        "--dead-letter",
        str(blocker / "lunary.jsonl"),
        "--batch-wait",
        "0.05",
        "--backoff-cap",
        "0.2",
        LUNARY_PUBLIC_KEY=LUNARY_KEY,
    )
    try:

        def tries() -> int:
            return sum(1 for e in fake.received if e["runId"] == refused and e["event"] == "start")

        # Refused for good, with nowhere to keep it: it stays in hand and is tried again.
        while tries() < 3 and process.poll() is None:
            await asyncio.sleep(0.05)
        assert process.poll() is None, (tmp_path / "dispatcher.log").read_text()
        assert "dispatcher.dead_letter_failed" in (tmp_path / "dispatcher.log").read_text()
        delivered = [e["runId"] for e in fake.received if e["event"] == "start"]
        assert sorted(r for r in delivered if r != refused) == sorted(
            run_id(e["id"]) for e in sent if e is not sent[2]
        )  # each accepted one once: acknowledged, not sent again with the refused one

        blocker.unlink()
        blocker.mkdir()
        while not (blocker / "lunary.jsonl").exists():
            await asyncio.sleep(0.05)
        while (await bus.client.xpending("dlw:events", "lunary"))["pending"]:
            await asyncio.sleep(0.05)
        [line] = (blocker / "lunary.jsonl").read_bytes().splitlines()
        assert orjson.loads(line)["event"]["id"] == sent[2]["id"]
        process.terminate()
        assert await finished(process, 30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        await bus.close()


@pytest.mark.redis
def test_a_burst_run_that_cannot_dead_letter_exits_1_leaving_the_refused_event_on_the_bus(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    sent = events(5)
    publish(redis_server.url, "dlb:events", sent)
    fake = FakeLunary()
    fake.refuse_run.add(run_id(sent[2]["id"]))
    blocker = tmp_path / "dead"
    blocker.write_text("")
    with serving(fake.app) as url:
        result = run(
            "--service",
            "lunary",
            "--lunary-url",
            url,
            "--burst",
            "--batch-wait",
            "0.05",
            "--stream",
            "dlb:events",
            "--dead-letter",
            str(blocker / "lunary.jsonl"),
            REDIS_URL=redis_server.url,
            DATA_DIR=str(tmp_path),
            LUNARY_PUBLIC_KEY=LUNARY_KEY,
        )
    assert result.exit_code == 1
    assert len(fake.runs) == 4
    pending = redis.Redis.from_url(redis_server.url).xpending("dlb:events", "lunary")
    assert pending["pending"] == 1  # the refused one, for the next run


@pytest.mark.redis
def test_a_dispatcher_creates_its_data_dir_private_whatever_the_umask(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    sent = events(2)
    publish(redis_server.url, "private:events", sent)
    data_dir = tmp_path / "fresh" / "data"
    previous = os.umask(0o022)  # the usual login umask: directories 0755 unless the code says
    try:
        code, _ = invoke(
            "--service",
            "file",
            "--burst",
            "--batch-wait",
            "0.05",
            "--stream",
            "private:events",
            REDIS_URL=redis_server.url,
            DATA_DIR=str(data_dir),
        )
    finally:
        os.umask(previous)
    assert code == 0
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((data_dir / "events.jsonl").stat().st_mode) == 0o600
