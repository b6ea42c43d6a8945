"""``llm-proxy dispatcher replay``: dead-letter files written by a real dispatcher, sent again to
real fake backends (aiohttp apps) and to moto's CloudWatch Logs."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner, Result

from dispatcher.backends.lunary import LunaryBackend, run_id
from dispatcher.cli import dispatcher_command
from dispatcher.deadletter import DeadLetterFile
from dispatcher.worker import Worker, WorkerSettings
from llm_proxy.events.builder import build
from llm_proxy.events.event import Event
from llm_proxy.events.memory import MemoryBus
from tests.dispatcher.aws import read_stored
from tests.dispatcher.fakes import HELICONE_KEY, LUNARY_KEY, FakeHelicone, FakeLunary, serving
from tests.dispatcher.test_cli import CLEAN_ENV
from tests.events.events_support import exchange
from tests.processes import Process, clean_env, cli_command, spawn

SECRET = "sk-wrong-and-secret"


def events(n: int) -> list[Event]:
    return [
        build(exchange(request={"model": "gpt-4o", "n": i}, response=b'{"choices": []}'))
        for i in range(n)
    ]


def replay(*args: str, **env: str) -> Result:
    return CliRunner().invoke(
        dispatcher_command, ["replay", *args], env={**CLEAN_ENV, **env}, catch_exceptions=False
    )


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def new_files(directory: Path, *known: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p not in known)


def dead_letters_of(path: Path, failures: list[Event], backend: str = "helicone") -> Path:
    """A dead-letter file as a dispatcher writes it."""
    asyncio.run(DeadLetterFile(path).write(backend, [(e, "HTTP 503: down") for e in failures]))
    return path


def test_replay_delivers_what_passes_now_and_keeps_what_still_fails_in_a_new_file(
    tmp_path: Path,
) -> None:
    sent = events(6)
    fake = FakeLunary()
    fake.refuse_run.update(run_id(e["id"]) for e in sent[:4])
    dead = tmp_path / "dead-letter-lunary.jsonl"
    with serving(fake.app) as url:
        # A dispatcher that had four events refused, as it happens in production.
        async def dispatch() -> None:
            bus = MemoryBus()
            worker = Worker(
                bus,
                LunaryBackend(LUNARY_KEY, url=url),
                WorkerSettings(
                    service="lunary", dead_letter_path=dead, poll=0.05, batch_wait=0.05, burst=True
                ),
            )
            worker.start()
            await bus.publish(sent)
            assert (await worker.async_run()).dead_lettered == 4

        asyncio.run(dispatch())
        torn = dead.read_bytes().splitlines()[0][:57].decode()
        with dead.open("a") as file:
            file.write(torn + "\n")  # a dispatcher killed mid-write
        original = dead.read_bytes()

        dry = replay(str(dead), "--service", "lunary", "--dry-run", LUNARY_PUBLIC_KEY=LUNARY_KEY)
        assert dry.exit_code == 0
        assert dry.stdout == (
            f"dry run: {dead} holds 4 events (lunary: 4) and 1 unreadable lines; "
            "nothing was sent to lunary\n"
        )
        received = len(fake.received)

        fake.refuse_run = {run_id(sent[3]["id"])}  # the cause fixed for three of them
        first = replay(
            str(dead), "--service", "lunary", "--lunary-url", url, LUNARY_PUBLIC_KEY=LUNARY_KEY
        )
        assert first.exit_code == 4, first.output
        assert first.stdout.splitlines() == [
            f"replayed {dead} to lunary: 5 read, 3 delivered, 2 failed (1 unreadable lines)",
            "idempotency: Lunary keeps one run per event (the run id comes from the event "
            "id): an event it already has is counted as delivered, not stored twice.",
        ]
        assert dead.read_bytes() == original  # never rewritten
        [output] = new_files(tmp_path, dead)
        assert output.name.startswith("dead-letter-lunary.replay-") and output.suffix == ".jsonl"
        assert first.stderr == f"what still fails is in {output}; {dead} was not changed\n"
        assert stat.S_IMODE(output.stat().st_mode) == 0o600
        # Unreadable lines first, then the events that still fail.
        unreadable, refused = lines(output)
        assert refused["event"] == sent[3] and refused["reason"] == "lunary: invalid input"
        assert refused["backend"] == "lunary"
        assert unreadable["line"] == torn
        assert unreadable["reason"].startswith("unreadable dead-letter line 5: ")
        assert {run_id(e["id"]) for e in sent[:3]} <= {
            r for r, run in fake.runs.items() if "end" in run
        }
        assert len(fake.received) > received

        # The new file is the one to replay next; the torn line is carried on, never lost.
        fake.refuse_run = set()
        final = tmp_path / "final.jsonl"
        second = replay(
            str(output),
            "--service",
            "lunary",
            "--lunary-url",
            url,
            "--dead-letter",
            str(final),
            LUNARY_PUBLIC_KEY=LUNARY_KEY,
        )
    assert second.exit_code == 4
    assert second.stdout.startswith(
        f"replayed {output} to lunary: 2 read, 1 delivered, 1 failed (1 unreadable lines)"
    )
    [carried] = lines(final)
    assert carried["line"] == torn and carried["reason"] == unreadable["reason"]
    assert run_id(sent[3]["id"]) in fake.runs


def test_a_refused_key_stops_the_replay_and_every_undelivered_event_is_kept(
    tmp_path: Path,
) -> None:
    failures = events(5)
    dead = dead_letters_of(tmp_path / "dead.jsonl", failures)
    fake = FakeHelicone()
    with serving(fake.app) as url:
        options = ("--service", "helicone", "--helicone-url", url + "/custom/v1/log")
        refused = replay(str(dead), *options, "--batch-size", "2", HELICONE_API_KEY=SECRET)
        assert refused.exit_code == 5
        assert SECRET not in refused.output
        [output] = new_files(tmp_path, dead)
        assert refused.stdout.startswith(
            f"replayed {dead} to helicone: 5 read, 0 delivered, 5 failed\n"
        )
        assert refused.stderr.splitlines()[-1] == (
            "helicone refused the credentials (HTTP 401): fix --helicone-api-key / "
            f"HELICONE_API_KEY and replay {output}"
        )
        assert fake.refused_keys == 2  # the first batch; the rest was not sent
        kept = lines(output)
        assert [line["event"]["id"] for line in kept] == [e["id"] for e in failures]
        assert {line["reason"] for line in kept} == {
            "not sent: helicone refused the credentials (HTTP 401)"
        }

        fixed = replay(str(output), *options, HELICONE_API_KEY=HELICONE_KEY)
    assert fixed.exit_code == 0, fixed.output
    assert fixed.stdout.startswith(f"replayed {output} to helicone: 5 read, 5 delivered, 0 failed")
    assert "Helicone does not promise to drop a repeated id" in fixed.stdout
    assert new_files(tmp_path, dead, output) == []  # nothing failed: no file
    assert sorted(log["providerRequest"]["meta"]["Helicone-Request-Id"] for log in fake.logs) == (
        sorted(e["id"] for e in failures)
    )


def test_retryable_refusals_are_retried_then_given_up_on(tmp_path: Path) -> None:
    dead = dead_letters_of(tmp_path / "dead.jsonl", events(2))
    fake = FakeHelicone()
    fake.answers = [503, 503, 503]  # two for the first attempt, one for the second
    with serving(fake.app) as url:
        result = replay(
            str(dead),
            "--service",
            "helicone",
            "--helicone-url",
            url + "/custom/v1/log",
            "--max-attempts",
            "2",
            HELICONE_API_KEY=HELICONE_KEY,
        )
    assert result.exit_code == 4
    assert result.stdout.startswith(f"replayed {dead} to helicone: 2 read, 1 delivered, 1 failed")
    [output] = new_files(tmp_path, dead)
    [line] = lines(output)
    assert line["reason"].startswith("gave up after 2 attempts: HTTP 503")
    assert len(fake.logs) == 1


def test_replay_never_writes_over_a_file(tmp_path: Path) -> None:
    dead = dead_letters_of(tmp_path / "dead.jsonl", events(1))
    taken = tmp_path / "taken.jsonl"
    taken.write_text("keep me\n")
    fake = FakeHelicone()
    with serving(fake.app) as url:
        for target, why in ((dead, "is FILE itself"), (taken, "is a file that exists")):
            result = replay(
                str(dead),
                "--service",
                "helicone",
                "--helicone-url",
                url,
                "--dead-letter",
                str(target),
                HELICONE_API_KEY=HELICONE_KEY,
            )
            assert result.exit_code == 2 and why in result.output
    assert not fake.logs and taken.read_text() == "keep me\n"


def test_replay_to_another_service_and_lines_that_hold_no_event(tmp_path: Path) -> None:
    sent = events(2)
    dead = dead_letters_of(tmp_path / "dead.jsonl", sent)
    with dead.open("ab") as file:
        file.write(b"[1, 2]\n\n" + b'{"backend": "helicone", "reason": "x"}\n' + b"\xff\xfe{\n")
    dry = replay(str(dead), "--service", "file", "--dry-run", DATA_DIR=str(tmp_path))
    assert dry.stdout == (
        f"dry run: {dead} holds 2 events (helicone: 2) and 3 unreadable lines; "
        "nothing was sent to file\n"
    )
    assert not (tmp_path / "events.jsonl").exists()

    result = replay(str(dead), "--service", "file", DATA_DIR=str(tmp_path))
    assert result.exit_code == 4
    assert result.stdout.splitlines() == [
        f"replayed {dead} to file: 5 read, 2 delivered, 3 failed (3 unreadable lines)",
        'idempotency: the file is appended to: an event it already has appears twice (same "id").',
    ]
    assert [e["id"] for e in lines(tmp_path / "events.jsonl")] == [e["id"] for e in sent]
    [output] = new_files(tmp_path, dead, tmp_path / "events.jsonl")
    carried = lines(output)
    assert [c["line"] for c in carried] == [
        "[1, 2]",
        '{"backend": "helicone", "reason": "x"}',
        "\\xff\\xfe{",
    ]
    assert [c["reason"].split(": ", 1)[0] for c in carried] == [
        "unreadable dead-letter line 3",
        "unreadable dead-letter line 5",
        "unreadable dead-letter line 6",
    ]


def test_a_backend_that_cannot_start_sends_nothing(tmp_path: Path) -> None:
    dead = dead_letters_of(tmp_path / "dead.jsonl", events(1))
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    result = replay(str(dead), "--service", "file", "--path", str(blocker / "events.jsonl"))
    assert result.exit_code == 1
    assert result.stderr.startswith("cannot start file: ")
    assert result.stderr.endswith(f"nothing was sent; {dead} is unchanged\n")
    assert new_files(tmp_path, dead, blocker) == []


def test_replay_to_cloudwatch(moto_url: str, tmp_path: Path) -> None:
    now = time.time()
    sent = [build(exchange(request={"n": i}, response=b"{}", started_at=now - i)) for i in range(3)]
    dead = dead_letters_of(tmp_path / "dead.jsonl", sent, backend="cloudwatch")
    result = replay(
        str(dead),
        "--service",
        "cloudwatch",
        "--region",
        "us-east-1",
        "--endpoint-url",
        moto_url,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
    )
    assert result.exit_code == 0, result.output
    assert "CloudWatch Logs does not deduplicate" in result.stdout
    assert sorted(e["id"] for e in asyncio.run(read_stored(moto_url))) == sorted(
        e["id"] for e in sent
    )


def test_refused_aws_credentials_at_start_send_nothing(
    moto_url: str, keys: list[dict[str, str]], tmp_path: Path
) -> None:
    dead = dead_letters_of(tmp_path / "dead.jsonl", events(2), backend="cloudwatch")
    result = replay(
        str(dead),
        "--service",
        "cloudwatch",
        "--region",
        "us-east-1",
        "--endpoint-url",
        moto_url,
        AWS_ACCESS_KEY_ID=keys[0]["aws_access_key_id"],
        AWS_SECRET_ACCESS_KEY=SECRET,
    )
    assert result.exit_code == 5
    assert result.stderr.splitlines()[0] == (
        f"cloudwatch refused the credentials (403 (HTTP 403)): nothing was sent; {dead} is "
        "unchanged"
    )
    assert SECRET not in result.output
    assert new_files(tmp_path, dead) == []


def test_an_event_a_backend_cannot_handle_is_retried_then_kept(tmp_path: Path) -> None:
    good, bad = events(2)
    bad["timestamp"] = "yesterday"  # a hand-edited file, say
    dead = dead_letters_of(tmp_path / "dead.jsonl", [good, bad])
    fake = FakeHelicone()
    with serving(fake.app) as url:
        result = replay(
            str(dead),
            "--service",
            "helicone",
            "--helicone-url",
            url + "/custom/v1/log",
            "--batch-size",
            "1",
            HELICONE_API_KEY=HELICONE_KEY,
        )
    assert result.exit_code == 4
    assert result.stdout.startswith(f"replayed {dead} to helicone: 2 read, 1 delivered, 1 failed")
    [output] = new_files(tmp_path, dead)
    [kept] = lines(output)
    assert kept["event"] == bad
    assert kept["reason"].startswith("gave up after 3 attempts: ValueError(")
    assert [log["providerRequest"]["meta"]["Helicone-Request-Id"] for log in fake.logs] == [
        good["id"]
    ]


async def test_a_dead_letter_that_cannot_be_written_as_json_is_kept_as_text(
    tmp_path: Path,
) -> None:
    path = tmp_path / "dead.jsonl"
    deep, fine = events(2)
    nested: object = 1
    for _ in range(300):
        nested = [nested]
    deep["request"] = nested
    await DeadLetterFile(path).write("file", [(deep, "not writable"), (fine, "HTTP 400")])
    kept, other = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert "event" not in kept and deep["request_id"] in kept["line"]
    assert other["event"] == fine


def test_the_help_says_a_lunary_run_id_comes_from_the_event_id() -> None:
    # Not the request id: calls sharing a client's X-Request-ID are runs of their own (and kept).
    text = " ".join(replay("--help").output.split())
    assert "Lunary keeps it once (run ids come from event ids)" in text


def test_the_help_names_the_new_file_as_a_replay_writes_it(tmp_path: Path) -> None:
    # It said "FILE's name + .replay-…", i.e. dl-1.jsonl.replay-…; the suffix is dropped.
    text = " ".join(replay("--help").output.split())
    assert "dl-1.replay-20250101T000000Z.jsonl for dl-1.jsonl" in text
    assert "another replay of FILE running" in text
    dead = dead_letters_of(tmp_path / "dl-1.jsonl", events(1))
    fake = FakeHelicone()
    fake.answers = [503]
    with serving(fake.app) as url:
        result = replay(
            str(dead),
            "--service",
            "helicone",
            "--helicone-url",
            url + "/custom/v1/log",
            "--max-attempts",
            "1",
            HELICONE_API_KEY=HELICONE_KEY,
        )
    assert result.exit_code == 4, result.output
    [output] = new_files(tmp_path, dead)
    assert re.fullmatch(r"dl-1\.replay-\d{8}T\d{6}Z\.jsonl", output.name)


def test_a_dry_run_needs_no_credentials(tmp_path: Path) -> None:
    # It only reads FILE: an operator looks at a dead-letter file where the keys are not.
    dead = dead_letters_of(tmp_path / "dead.jsonl", events(3), backend="lunary")
    for service in ("lunary", "helicone", "cloudwatch"):
        dry = replay(str(dead), "--service", service, "--dry-run", AWS_CONFIG_FILE="/nonexistent")
        assert dry.exit_code == 0, dry.output
        assert dry.stdout == (
            f"dry run: {dead} holds 3 events (lunary: 3); nothing was sent to {service}\n"
        )


def test_a_replay_takes_the_service_and_file_given_before_it(tmp_path: Path) -> None:
    """`llm-proxy dispatcher --service file --path OUT replay DEAD`: the backend named before
    `replay` is the one replayed to, as `check` takes it, not a usage error."""
    dead = dead_letters_of(tmp_path / "dead.jsonl", events(2), backend="file")
    out = tmp_path / "again.jsonl"
    result = CliRunner().invoke(
        dispatcher_command,
        ["--service", "file", "--path", str(out), "replay", str(dead)],
        env=CLEAN_ENV,
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert [e["id"] for e in lines(out)] == [e["event"]["id"] for e in lines(dead)]


def helicone_ids(fake: FakeHelicone) -> list[str]:
    return [log["providerRequest"]["meta"]["Helicone-Request-Id"] for log in fake.logs]


def replay_process(dead: Path, url: str, logs: Path, name: str) -> Process:
    """``llm-proxy dispatcher replay`` as an operator runs it, one event per batch."""
    command = cli_command(
        "dispatcher", "replay", str(dead), "--service", "helicone", "--batch-size", "1"
    )
    env = clean_env(HELICONE_API_KEY=HELICONE_KEY, HELICONE_URL=url + "/custom/v1/log")
    return spawn(command, env, logs, name)


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.02)


def slow_replay_of(
    tmp_path: Path, count: int, delay: float
) -> tuple[list[Event], Path, FakeHelicone]:
    """``count`` events dead-lettered in a directory of their own (the tests check FILE is all
    it holds at the end) and a Helicone taking ``delay`` s a batch, for a replay to be caught
    midway."""
    sent = events(count)
    work = tmp_path / "work"
    work.mkdir()
    fake = FakeHelicone()
    fake.delay = delay
    return sent, dead_letters_of(work / "dead.jsonl", sent), fake


def replay_to_its_end(dead: Path, url: str, logs: Path) -> Process:
    """A second replay of ``dead``, run until it exits 0."""
    second = replay_process(dead, url, logs, "second")
    try:
        assert second.popen.wait(30) == 0, second.stderr
    finally:
        second.stop()
    return second


@pytest.mark.process
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_replay_resumes_after_what_it_delivered(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # Interrupted, a replay once kept no record of what it had delivered: run again, it sent
    # all of FILE again, and Helicone, CloudWatch and the file store what they had twice.
    sent, dead, fake = slow_replay_of(tmp_path, 8, 0.1)
    with serving(fake.app) as url:
        first = replay_process(dead, url, tmp_path / "logs", "first")
        try:
            wait_until(lambda: len(fake.logs) >= 3)
            first.popen.send_signal(sig)
            assert first.popen.wait(15) == 7, first.stderr
        finally:
            first.stop()
        delivered = helicone_ids(fake)
        assert 3 <= len(delivered) < len(sent)
        assert delivered == [e["id"] for e in sent[: len(delivered)]]
        assert f"interrupted after line {len(delivered)} of {dead}" in first.stderr
        assert (dead.parent / "dead.jsonl.replay-progress").exists()

        second = replay_to_its_end(dead, url, tmp_path / "logs")
    assert f"resuming {dead} after line {len(delivered)}" in second.stderr
    assert second.stdout.startswith(
        f"replayed {dead} to helicone: {len(sent) - len(delivered)} read,"
        f" {len(sent) - len(delivered)} delivered, 0 failed"
    )
    assert helicone_ids(fake) == [e["id"] for e in sent]  # each once, in order
    assert sorted(dead.parent.iterdir()) == [dead]  # no progress left, and nothing failed


@pytest.mark.process
def test_a_replay_killed_midway_sends_again_at_most_the_batch_it_was_sending(
    tmp_path: Path,
) -> None:
    sent, dead, fake = slow_replay_of(tmp_path, 8, 0.1)
    with serving(fake.app) as url:
        first = replay_process(dead, url, tmp_path / "logs", "first")
        try:
            wait_until(lambda: len(fake.logs) >= 3)
            first.popen.kill()  # no chance to say anything: only the progress kept counts
            first.popen.wait(15)
        finally:
            first.stop()
        replay_to_its_end(dead, url, tmp_path / "logs")
    ids = helicone_ids(fake)
    assert sorted(set(ids)) == sorted(e["id"] for e in sent)
    assert len(ids) <= len(sent) + 1  # the one batch in flight as it was killed, at most
    assert sorted(dead.parent.iterdir()) == [dead]


@pytest.mark.process
def test_a_replay_removes_the_progress_a_killed_one_was_saving(tmp_path: Path) -> None:
    # Killed between creating its temporary progress file and renaming it, a replay left the
    # file beside FILE for good, one more per kill.
    sent, dead, fake = slow_replay_of(tmp_path, 2, 0.0)
    stray = dead.parent / "dead.jsonl.replay-progress.k1ll3d.tmp"
    stray.write_bytes(b'{"offset": 1')
    with serving(fake.app) as url:
        replay_to_its_end(dead, url, tmp_path / "logs")
    assert helicone_ids(fake) == [e["id"] for e in sent]
    assert sorted(dead.parent.iterdir()) == [dead]


def test_a_progress_file_of_another_file_is_refused(tmp_path: Path) -> None:
    dead = dead_letters_of(tmp_path / "dead.jsonl", events(3))
    (tmp_path / "dead.jsonl.replay-progress").write_text(
        '{"file": [0, 0], "offset": 10, "line": 1, "dead_letter": "x.jsonl"}'
    )
    result = replay(str(dead), "--service", "file", DATA_DIR=str(tmp_path))
    assert result.exit_code == 2
    assert "is the progress of another file than" in result.output
    assert "to replay" in result.output and "from its start" in result.output


def test_the_progress_file_is_never_written_through_a_link_planted_beside_it(
    tmp_path: Path,
) -> None:
    # The progress was written to FILE.replay-progress.tmp, opened as it stood: a symlink planted
    # there (in a dead-letter directory others can write) had the operator's replay overwrite the
    # file it points to with its JSON, whatever that file was.
    dead = dead_letters_of(tmp_path / "dead.jsonl", events(3))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "dead.jsonl.replay-progress.tmp").symlink_to(victim)
    result = replay(
        str(dead), "--service", "file", "--batch-size", "1", DATA_DIR=str(tmp_path / "data")
    )
    assert result.exit_code == 0, result.output
    assert "3 delivered" in result.output
    assert victim.read_text() == "precious\n"
    assert not (tmp_path / "dead.jsonl.replay-progress").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file of another user's takes root")
def test_a_progress_file_of_another_user_is_refused(tmp_path: Path) -> None:
    # The progress names the dead-letter file a resumed replay appends to: one put beside FILE by
    # another user (a directory others can write) had the replay append events to a file of the
    # operator's that it chose.
    dead = dead_letters_of(tmp_path / "dead.jsonl", events(3))
    chosen = tmp_path / "chosen.txt"
    chosen.write_text("precious\n")
    found = os.stat(dead)
    planted = tmp_path / "dead.jsonl.replay-progress"
    planted.write_bytes(
        orjson.dumps(
            {
                "file": [found.st_dev, found.st_ino],
                "offset": 0,
                "line": 0,
                "dead_letter": str(chosen),
            }
        )
    )
    os.chown(planted, 65534, 65534)
    result = replay(
        str(dead),
        "--service",
        "helicone",
        HELICONE_API_KEY=HELICONE_KEY,
        HELICONE_URL="http://127.0.0.1:9/custom/v1/log",
        DATA_DIR=str(tmp_path),
    )
    assert result.exit_code == 2, result.output
    assert "is not this user's own" in result.output
    assert chosen.read_text() == "precious\n"


@pytest.mark.process
def test_a_second_replay_of_a_file_being_replayed_is_refused(tmp_path: Path) -> None:
    # Two replays of one FILE at once (two operators, or one who thought the first had hung)
    # each sent every event, and wrote their progress over each other's.
    sent, dead, fake = slow_replay_of(tmp_path, 6, 0.2)
    with serving(fake.app) as url:
        first = replay_process(dead, url, tmp_path / "logs", "first")
        try:
            wait_until(lambda: len(fake.logs) >= 1)
            second = replay(
                str(dead),
                "--service",
                "helicone",
                HELICONE_API_KEY=HELICONE_KEY,
                HELICONE_URL=url + "/custom/v1/log",
            )
            assert second.exit_code == 2, second.output
            assert f"another replay of {dead} is running" in second.output
            assert first.popen.wait(30) == 0, first.stderr
        finally:
            first.stop()
        assert helicone_ids(fake) == [e["id"] for e in sent]  # each once
    assert sorted(dead.parent.iterdir()) == [dead]
