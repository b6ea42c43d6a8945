from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from llm_proxy.events import EventsConfig, start_event_pipeline
from llm_proxy.events.builder import build
from llm_proxy.events.bus import BusUnavailable
from llm_proxy.events.event import Event
from llm_proxy.events.gone_groups import GoneGroups
from llm_proxy.events.redis import RedisBus
from llm_proxy.events.spool import Spool
from tests.events.events_support import RedisServer, exchange

pytestmark = pytest.mark.redis


def events(n: int) -> list[Event]:
    return [build(exchange(request={"n": i}, response=b"{}")) for i in range(n)]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_each_group_gets_every_event_and_acks_are_per_group(
    redis_server: RedisServer,
) -> None:
    bus = await RedisBus.open(redis_server.url, stream="t:events")
    try:
        file_group = bus.subscribe("file", "a")
        lunary_group = bus.subscribe("lunary", "a")
        await file_group.read(10, 0.01)  # create the groups before publishing
        await lunary_group.read(10, 0.01)
        sent = events(7)
        await bus.publish(sent)

        for group in (file_group, lunary_group):
            got = await group.read(100, 1.0)
            assert [d.event for d in got] == sent
            assert not any(d.redelivered for d in got)
            await group.ack([d.id for d in got])
        pending = await bus.client.xpending("t:events", "file")
        assert pending["pending"] == 0
        assert await bus.ping()
    finally:
        await bus.close()


async def test_a_new_group_reads_from_the_start_of_the_stream(redis_server: RedisServer) -> None:
    bus = await RedisBus.open(redis_server.url, stream="t:events")
    try:
        sent = events(3)
        await bus.publish(sent)
        late = bus.subscribe("cloudwatch", "a")
        assert [d.event for d in await late.read(10, 1.0)] == sent
    finally:
        await bus.close()


async def test_a_stream_no_group_reads_is_kept_to_its_length_cap(
    redis_server: RedisServer,
) -> None:
    """No dispatcher service has started yet: nothing pins the stream, and nobody missed an event."""
    trimmed = metric("llm_proxy_events_trimmed_total", reason="no_group")
    dropped = metric("llm_proxy_events_dropped_total", reason="trimmed_unacknowledged")
    bus = await RedisBus.open(redis_server.url, stream="t:events", maxlen=100)
    try:
        batch = events(1)
        for _ in range(20):
            await bus.publish(batch * 50)
        await bus.trim()
        assert await bus.client.xlen("t:events") == 100
        assert metric("llm_proxy_events_trimmed_total", reason="no_group") == trimmed + 900
        assert metric("llm_proxy_events_dropped_total", reason="trimmed_unacknowledged") == dropped
    finally:
        await bus.close()


async def test_trimming_removes_only_what_every_group_has_acknowledged(
    redis_server: RedisServer,
) -> None:
    trimmed = metric("llm_proxy_events_trimmed_total", reason="acknowledged")
    bus = await RedisBus.open(redis_server.url, stream="t:events", maxlen=1000, new_group_grace=0)
    try:
        file_group, helicone = bus.subscribe("file", "a"), bus.subscribe("helicone", "a")
        await file_group.read(10, 0.01)
        await helicone.read(10, 0.01)
        sent = events(10)
        await bus.publish(sent)
        await file_group.ack([d.id for d in await file_group.read(100, 1.0)])
        four = await helicone.read(4, 1.0)
        await helicone.ack([d.id for d in four[:2]])  # the other two still pending

        await bus.trim()
        assert await bus.client.xlen("t:events") == 8
        await helicone.ack([d.id for d in four[2:]])
        await bus.trim()
        assert await bus.client.xlen("t:events") == 6  # helicone has not read the rest
        rest = await helicone.read(100, 1.0)
        assert [d.event for d in rest] == sent[4:]
        await helicone.ack([d.id for d in rest])
        await bus.trim()
        assert await bus.client.xlen("t:events") == 0
        assert metric("llm_proxy_events_trimmed_total", reason="acknowledged") == trimmed + 10
        assert helicone.lost == file_group.lost == 0
    finally:
        await bus.close()


async def test_the_bus_trims_what_was_acknowledged_on_its_own(redis_server: RedisServer) -> None:
    """Once a second, and what every group acknowledged only once it is older than the grace
    kept for a service whose group does not exist yet: a dispatcher started with the servers,
    a little after their first events, finds them."""
    bus = await RedisBus.open(redis_server.url, stream="t:events", new_group_grace=2.0)
    try:
        reader = bus.subscribe("usage", "a")
        await reader.read(10, 0.01)
        sent = events(3)
        await bus.publish(sent)
        await reader.ack([d.id for d in await reader.read(10, 1.0)])
        published = time.monotonic()
        await asyncio.sleep(1.2)  # a trim or two later
        assert await bus.client.xlen("t:events") == 3
        late = bus.subscribe("file", "a")  # its first dispatcher, a second after
        got = await late.read(10, 1.0)
        assert [d.event for d in got] == sent
        await late.ack([d.id for d in got])
        deadline = time.monotonic() + 5
        while await bus.client.xlen("t:events"):
            assert time.monotonic() < deadline, "acknowledged entries were never trimmed"
            await asyncio.sleep(0.02)
        assert time.monotonic() - published > 1.9  # not before the grace ran out
    finally:
        await bus.close()


async def test_over_the_cap_what_every_group_read_goes_first_and_is_not_counted_lost(
    redis_server: RedisServer,
) -> None:
    """The minute of acknowledged entries kept for a group yet to come gives way to the cap: they
    go before anything unread, and as what they are (acknowledged), not as events lost."""
    trimmed = metric("llm_proxy_events_trimmed_total", reason="acknowledged")
    dropped = metric("llm_proxy_events_dropped_total", reason="trimmed_unacknowledged")
    bus = await RedisBus.open(redis_server.url, stream="t:events", maxlen=5)
    try:
        reader = bus.subscribe("file", "a")
        await reader.read(10, 0.01)
        await bus.publish(events(4))
        await reader.ack([d.id for d in await reader.read(10, 1.0)])
        await bus.trim()
        assert await bus.client.xlen("t:events") == 4  # kept: within the minute, under the cap
        unread = events(3)
        await bus.publish(unread)  # 7 entries: over the cap of 5
        await bus.trim()
        assert await bus.client.xlen("t:events") == 3
        assert [d.event for d in await reader.read(10, 1.0)] == unread
        assert metric("llm_proxy_events_trimmed_total", reason="acknowledged") == trimmed + 4
        assert metric("llm_proxy_events_dropped_total", reason="trimmed_unacknowledged") == dropped
    finally:
        await bus.close()


async def test_entries_the_cap_trims_before_a_group_read_them_are_counted_and_told_to_it(
    redis_server: RedisServer,
) -> None:
    """A dispatcher service down while the stream outgrew its cap: the events it never read are
    counted where they were trimmed, and its next reader learns how many, once."""
    unacknowledged = metric("llm_proxy_events_dropped_total", reason="trimmed_unacknowledged")
    undelivered = metric("llm_proxy_events_dropped_total", reason="trimmed_before_delivery")
    bus = await RedisBus.open(redis_server.url, stream="t:events", maxlen=20)
    try:
        helicone = bus.subscribe("helicone", "a")
        await helicone.read(10, 0.01)
        sent = events(50)
        await bus.publish(sent)
        with capture_logs() as logs:
            await bus.trim()
        (line,) = [e for e in logs if e["event"] == "events.redis_unacknowledged_trimmed"]
        assert (line["log_level"], line["count"], line["unread"]) == ("error", 30, {"helicone": 30})
        assert metric("llm_proxy_events_dropped_total", reason="trimmed_unacknowledged") == (
            unacknowledged + 30
        )

        with capture_logs() as logs:
            got = await helicone.read(100, 1.0)
        (line,) = [e for e in logs if e["event"] == "events.redis_unread_entries_trimmed"]
        assert (line["log_level"], line["group"], line["count"]) == ("error", "helicone", 30)
        assert [d.event for d in got] == sent[30:]
        assert helicone.lost == 30
        assert metric("llm_proxy_events_dropped_total", reason="trimmed_before_delivery") == (
            undelivered + 30
        )
        await helicone.ack([d.id for d in got])

        more = events(25)
        await bus.publish(more)  # beyond the cap again, but read before it is applied
        late = await helicone.read(100, 1.0)
        await helicone.ack([d.id for d in late])
        await bus.trim()
        assert await helicone.read(100, 0.01) == []
        assert helicone.lost == 30  # not counted twice
        (group,) = await bus.client.xinfo_groups("t:events")
        assert group["lag"] == 0 and group["entries-read"] == 75

        await bus.publish(events(25))  # now unread: 5 of them go
        await bus.trim()
        assert len(await helicone.read(100, 1.0)) == 20
        assert helicone.lost == 35

        again = bus.subscribe("helicone", "b")
        await again.read(100, 0.01)
        assert again.lost == 0  # told once, to one reader of the group
    finally:
        await bus.close()


async def test_entries_pending_on_a_dead_consumer_are_reclaimed(redis_server: RedisServer) -> None:
    bus = await RedisBus.open(redis_server.url, stream="t:events", claim_idle=0.2)
    try:
        dead = bus.subscribe("file", "dead")
        await dead.read(10, 0.01)
        sent = events(5)
        await bus.publish(sent)
        taken = await dead.read(10, 1.0)
        assert len(taken) == 5
        await dead.close()  # dies without acknowledging

        alive = bus.subscribe("file", "alive")
        assert await alive.read(10, 0.05) == []  # not idle long enough yet
        await asyncio.sleep(0.3)
        alive._next_claim = 0.0  # do not wait for the periodic claim pass
        reclaimed = await alive.read(10, 0.05)
        assert [d.event for d in reclaimed] == sent
        assert all(d.redelivered for d in reclaimed)
        await alive.ack([d.id for d in reclaimed])
        assert (await bus.client.xpending("t:events", "file"))["pending"] == 0
    finally:
        await bus.close()


async def test_redis_outage_spools_in_order_and_replays_when_back(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    spool_path = tmp_path / "data" / "events-spool.jsonl"
    bus = await RedisBus.open(redis_server.url, stream="t:events", spool_path=spool_path)
    spooled_before = metric("llm_proxy_events_spooled_total")
    try:
        reader = bus.subscribe("file", "a")
        await reader.read(10, 0.01)
        first = events(3)
        await bus.publish(first)
        assert [d.event for d in await reader.read(10, 1.0)] == first

        redis_server.stop()
        assert not await bus.ping()
        with pytest.raises(BusUnavailable):
            await reader.read(10, 0.1)
        during = [events(4), events(4)]
        for batch in during:
            started = time.monotonic()
            await bus.publish(batch)
            assert time.monotonic() - started < 1.0
        assert bus.spooling
        assert len(spool_path.read_bytes().splitlines()) == 8
        assert metric("llm_proxy_events_spooled_total") == spooled_before + 8

        redis_server.start()  # same port, empty: the stream and its groups are gone
        after = events(2)
        await bus.publish(after)  # the spool is not empty yet: this must queue behind it
        await wait_for(lambda: not bus.spooling)
        assert spool_path.read_bytes() == b""

        got: list[Event] = []
        while len(got) < 10:
            got += [d.event for d in await reader.read(100, 1.0)]  # recreates the lost group
        assert got == during[0] + during[1] + after
    finally:
        await bus.close()


async def test_a_spool_left_by_a_previous_run_is_replayed_at_start(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    spool_path = tmp_path / "events-spool.jsonl"
    left = events(5)
    Spool(spool_path).append(left)
    bus = await RedisBus.open(redis_server.url, stream="t:events", spool_path=spool_path)
    try:
        await wait_for(lambda: not bus.spooling)
        reader = bus.subscribe("file", "a")
        assert [d.event for d in await reader.read(10, 1.0)] == left
    finally:
        await bus.close()


async def test_without_a_spool_an_outage_drops_and_counts(redis_server: RedisServer) -> None:
    before = metric("llm_proxy_events_dropped_total", reason="redis_unavailable")
    bus = await RedisBus.open(redis_server.url, stream="t:events")
    redis_server.stop()
    try:
        await bus.publish(events(3))
        assert metric("llm_proxy_events_dropped_total", reason="redis_unavailable") == before + 3
    finally:
        await bus.close()


async def test_unusable_entries_are_acknowledged_and_counted(redis_server: RedisServer) -> None:
    before = metric("llm_proxy_events_dropped_total", reason="bus_entry_unusable")
    bus = await RedisBus.open(redis_server.url, stream="t:events")
    try:
        reader = bus.subscribe("file", "a")
        await reader.read(10, 0.01)
        await bus.client.xadd("t:events", {"other": "x"})
        await bus.client.xadd("t:events", {"e": "not json"})
        good = events(1)
        await bus.publish(good)
        assert [d.event for d in await reader.read(10, 1.0)] == good
        assert metric("llm_proxy_events_dropped_total", reason="bus_entry_unusable") == before + 2
        assert (await bus.client.xpending("t:events", "file"))["pending"] == 1
    finally:
        await bus.close()


async def test_acknowledging_after_redis_lost_the_group_is_not_an_error(
    redis_server: RedisServer,
) -> None:
    bus = await RedisBus.open(redis_server.url, stream="t:events")
    try:
        reader = bus.subscribe("file", "a")
        await reader.read(10, 0.01)
        await bus.client.delete("t:events")
        await reader.ack(["1-0"])
        redis_server.stop()
        with pytest.raises(BusUnavailable):
            await reader.ack(["1-0"])
    finally:
        await bus.close()


async def test_a_group_lost_with_redis_s_data_is_logged_and_counted(
    redis_server: RedisServer,
) -> None:
    """Redis restarted without persistence: what the group had not delivered is gone, and the
    dispatcher cannot tell how much, but it says that it happened."""
    before = metric("llm_proxy_events_redis_groups_lost_total")
    bus = await RedisBus.open(redis_server.url, stream="t:events")
    try:
        reader = bus.subscribe("helicone", "a")
        await reader.read(10, 0.01)
        await bus.publish(events(3))  # never read
        redis_server.stop()
        redis_server.start()
        with capture_logs() as logs:
            with pytest.raises(BusUnavailable):  # the connection the old Redis closed
                await reader.read(10, 0.01)
            assert await reader.read(10, 0.01) == []
        await bus.ping()  # the publisher's connection, likewise
        (line,) = [e for e in logs if e["event"] == "events.redis_group_lost"]
        assert (line["log_level"], line["group"]) == ("error", "helicone")
        assert metric("llm_proxy_events_redis_groups_lost_total") == before + 1
        assert reader.lost == 1

        after = events(2)
        await bus.publish(after)
        assert [d.event for d in await reader.read(10, 1.0)] == after  # the group is back
        assert metric("llm_proxy_events_redis_groups_lost_total") == before + 1
    finally:
        await bus.close()


async def test_a_redis_full_of_acknowledged_events_frees_itself_and_takes_the_spool(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """At maxmemory with noeviction Redis refuses XADD but not XACK or XTRIM: the trimming, which
    runs apart from publishing, frees what the dispatchers acknowledged and the spool drains."""
    bus = await RedisBus.open(
        redis_server.url, stream="t:events", spool_path=tmp_path / "events-spool.jsonl"
    )
    try:
        reader = bus.subscribe("file", "a")
        await reader.read(10, 0.01)
        sent = [build(exchange(request={"n": i, "pad": "x" * 4000})) for i in range(600)]
        await bus.publish(sent[:100])
        used = (await bus.client.info("memory"))["used_memory"]
        await bus.client.config_set("maxmemory-policy", "noeviction")
        await bus.client.config_set("maxmemory", used + 200_000)
        published = 100
        while not bus.spooling:
            assert published < len(sent), "Redis never refused a write"
            await bus.publish(sent[published : published + 10])
            published += 10
        await bus.publish(sent[published:])

        delivered: set[str] = set()
        deadline = time.monotonic() + 30
        while bus.spooling or len(delivered) < len(sent):
            assert time.monotonic() < deadline, (
                f"stuck: {len(delivered)} of {len(sent)} delivered, spooling={bus.spooling}"
            )
            got = await reader.read(200, 0.1)
            delivered.update(d.event["id"] for d in got)
            await reader.ack([d.id for d in got])
        assert delivered == {e["id"] for e in sent}
        assert (await bus.client.config_get("maxmemory"))["maxmemory"] == str(used + 200_000)
    finally:
        await bus.close()


async def test_pipeline_publishes_to_redis(redis_server: RedisServer, tmp_path: Path) -> None:
    config = EventsConfig(
        bus="redis", redis_url=redis_server.url, data_dir=tmp_path, stream="t:events"
    )
    assert "redis://" not in repr(config)
    pipeline = await start_event_pipeline(config)
    reader = pipeline.bus.subscribe("file", "a")
    await reader.read(1, 0.01)
    ex = exchange(request={"model": "gpt-4o"}, response=b"{}")
    pipeline.submit(ex)
    got = await reader.read(1, 2.0)
    assert got[0].event["request_id"] == ex.request_id
    await pipeline.close()


async def test_a_consumer_leaves_its_group_on_close_unless_it_holds_entries(
    redis_server: RedisServer,
) -> None:
    """Every start names a new consumer; without leaving, a group kept one per run for good."""
    bus = await RedisBus.open(redis_server.url, stream="t:events")
    try:
        done = bus.subscribe("file", "done")
        await done.read(10, 0.01)
        await bus.publish(events(2))
        await done.ack([d.id for d in await done.read(10, 1.0)])
        await done.close()
        assert await bus.client.xinfo_consumers("t:events", "file") == []

        holding = bus.subscribe("file", "holding")
        await bus.publish(events(1))
        assert len(await holding.read(10, 1.0)) == 1  # read, never acknowledged
        await holding.close()
        (left,) = await bus.client.xinfo_consumers("t:events", "file")
        assert (left["name"], left["pending"]) == (b"holding", 1)  # claimable by another
    finally:
        await bus.close()


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


async def test_an_event_that_cannot_be_written_costs_only_itself(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # Such an event is no longer built (a deep body is shown as text); one from an older version
    # must still not cost its batch.
    before = metric("llm_proxy_events_dropped_total", reason="unwritable")
    sent = events(5)
    sent[2]["request"] = nested(300)
    bus = await RedisBus.open(redis_server.url, stream="t:events")
    try:
        group = bus.subscribe("file", "a")
        await group.read(10, 0.01)
        await bus.publish(sent)
        got = await group.read(100, 1.0)
        assert [d.event for d in got] == sent[:2] + sent[3:]
        assert metric("llm_proxy_events_dropped_total", reason="unwritable") == before + 1
        Spool(tmp_path / "spool.jsonl").append(sent)  # and the spool, written the same way
        assert len((tmp_path / "spool.jsonl").read_bytes().splitlines()) == 4
        assert metric("llm_proxy_events_dropped_total", reason="unwritable") == before + 2
    finally:
        await bus.close()


async def test_a_spool_left_by_a_worker_count_that_shrank_is_replayed(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    left = events(5)
    Spool(tmp_path / "events-spool-1.jsonl").append(left)  # worker 1's, which no longer runs
    bus = await RedisBus.open(
        redis_server.url,
        stream="t:events",
        spool_path=tmp_path / "events-spool.jsonl",
        spool_family="events-spool*.jsonl",
    )
    try:
        reader = bus.subscribe("file", "a")
        got: list[Event] = []
        deadline = time.monotonic() + 10
        while len(got) < 5 and time.monotonic() < deadline:
            got += [d.event for d in await reader.read(10, 0.2)]
        assert got == left
        await wait_for(lambda: not Spool(tmp_path / "events-spool-1.jsonl").pending)
    finally:
        await bus.close()


async def test_two_buses_never_write_one_spool(redis_server: RedisServer, tmp_path: Path) -> None:
    # The second (a predecessor still ending holds the first) spools beside it, and its spool is
    # claimed and replayed by the next bus once it is gone.
    path = tmp_path / "events-spool.jsonl"
    options: dict[str, object] = {"stream": "t:events", "spool_family": "events-spool*.jsonl"}
    first = await RedisBus.open(redis_server.url, spool_path=path, **options)
    second = await RedisBus.open(redis_server.url, spool_path=path, **options)
    redis_server.stop()
    try:
        await first.publish(events(2))
        await second.publish(events(3))
        assert len(path.read_bytes().splitlines()) == 2
        (stand_in,) = [p for p in tmp_path.glob("events-spool-*.jsonl")]
        assert len(stand_in.read_bytes().splitlines()) == 3
    finally:
        await second.close()
        await first.close()
    redis_server.start()
    third = await RedisBus.open(redis_server.url, spool_path=path, **options)
    try:
        await wait_for(lambda: not third.spooling and not Spool(stand_in).pending)
        assert await third.client.xlen("t:events") == 5
    finally:
        await third.close()


async def test_only_file_log_groups_no_one_reads_are_let_go_not_a_slow_one_nor_a_service(
    redis_server: RedisServer,
) -> None:
    """A server's file log still delivering entries it holds for long is alive: it stays. A
    dispatcher service down all along stays. Only a file@ group no one reads goes, counted."""
    bus = RedisBus(redis_server.url, stream="g:events")
    gone_groups = GoneGroups(bus.client, bus.stream, bus.trimmed_unread_key, idle=0.5)
    try:
        behind = bus.subscribe("file@live:/var/events.jsonl", "a")
        await behind.read(1, 0.01)  # the group, before the events
        await bus.client.xgroup_create(bus.stream, "helicone", id="0")
        await bus.client.xgroup_create(bus.stream, "file@gone:/var/events.jsonl", id="0")
        await bus.publish(events(3))
        held = [d.id for d in await behind.read(3, 1.0)]
        assert len(held) == 3
        published = time.monotonic()
        while time.monotonic() - published < 1.0:  # past the idle time, delivering them all along
            await behind.keep(held)  # as a worker does with a batch it is still delivering
            await asyncio.sleep(0.05)
        before = metric("llm_proxy_events_dropped_total", reason="instance_group_released")
        with capture_logs() as logs:
            assert await gone_groups.release() == 1
        names = {g["name"] for g in await bus.client.xinfo_groups(bus.stream)}
        assert names == {b"file@live:/var/events.jsonl", b"helicone"}
        [line] = [line for line in logs if line["event"].endswith("instance_group_released")]
        assert (line["group"], line["unacknowledged"]) == ("file@gone:/var/events.jsonl", 3)
        after = metric("llm_proxy_events_dropped_total", reason="instance_group_released")
        assert after - before == 3
    finally:
        await bus.close()
