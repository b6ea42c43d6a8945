from __future__ import annotations

import asyncio
import time

import orjson
from prometheus_client import REGISTRY

from llm_proxy.events import EventsConfig, start_event_pipeline
from llm_proxy.events.builder import build
from llm_proxy.events.event import Event
from llm_proxy.events.memory import MemoryBus
from llm_proxy.events.pipeline import EventPipeline
from llm_proxy.proxy.exchange import Exchange
from tests.events.events_support import exchange

ANSWER = orjson.dumps(
    {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_every_group_gets_every_event() -> None:
    pipeline = await start_event_pipeline(EventsConfig(bus="memory"))
    files = pipeline.bus.subscribe("file", "c1")
    lunary = pipeline.bus.subscribe("lunary", "c1")
    exchanges = [
        exchange(request={"model": "gpt-4o", "messages": []}, response=ANSWER) for _ in range(5)
    ]
    for ex in exchanges:
        pipeline.submit(ex)
    await pipeline.close()

    for subscription in (files, lunary):
        got = await subscription.read(10, 0.1)
        assert [d.event["request_id"] for d in got] == [ex.request_id for ex in exchanges]
        await subscription.ack([d.id for d in got])
    assert pipeline.published == 5 and pipeline.dropped == 0


async def test_a_full_queue_drops_the_oldest_and_counts_it() -> None:
    before = metric("llm_proxy_events_dropped_total", reason="queue_full")
    bus = MemoryBus()
    subscription = bus.subscribe("file", "c1")
    pipeline = EventPipeline(bus, queue_size=3)
    exchanges = [exchange(request={}, response=b"{}") for _ in range(5)]
    for ex in exchanges:
        pipeline.submit(ex)  # not started yet: nothing is consumed
    pipeline.start()
    await pipeline.close()

    got = await subscription.read(10, 0.1)
    assert [d.event["request_id"] for d in got] == [ex.request_id for ex in exchanges[2:]]
    assert pipeline.dropped == 2
    assert metric("llm_proxy_events_dropped_total", reason="queue_full") == before + 2


async def test_a_producer_waiting_for_room_loses_nothing() -> None:
    bus = MemoryBus()
    subscription = bus.subscribe("file", "c1")
    pipeline = EventPipeline(bus, queue_size=4, batch_size=2, linger=0.001)
    exchanges = [exchange(request={}, response=b"{}") for _ in range(21)]
    for ex in exchanges[:3]:
        pipeline.submit(ex)
    await pipeline.wait_for_room(1, 0)  # 3 + 1 fit: no wait
    waiting = asyncio.ensure_future(pipeline.wait_for_room(2, 0))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # 3 + 2 do not, and nothing consumes yet: the producer is held
    pipeline.start()
    await waiting
    for start in range(3, 21, 3):
        frame = exchanges[start : start + 3]
        await pipeline.wait_for_room(len(frame), 0)
        for ex in frame:
            pipeline.submit(ex)
    await pipeline.wait_for_room(9, 0)  # more than the queue holds: waits until it is empty
    await pipeline.close()

    got = await subscription.read(30, 0.1)
    assert [d.event["request_id"] for d in got] == [ex.request_id for ex in exchanges]
    assert pipeline.dropped == 0


async def test_the_queue_is_bounded_by_the_bytes_of_its_bodies_too() -> None:
    before = metric("llm_proxy_events_dropped_total", reason="queue_full")
    bus = MemoryBus()
    subscription = bus.subscribe("file", "c1")
    pipeline = EventPipeline(bus, queue_bytes=50_000)
    exchanges = [exchange(request=b"x" * 10_000, response=b"y" * 10_000) for _ in range(5)]
    for ex in exchanges:
        pipeline.submit(ex)  # not started: 2 hold 40,000 bytes, a third would be 60,000
    assert pipeline.dropped == 3
    held = asyncio.ensure_future(pipeline.wait_for_room(1, 20_000))
    await asyncio.sleep(0.05)
    assert not held.done()  # a frame of 20,000 more bytes would not fit: its reader waits
    pipeline.start()
    await held
    await pipeline.close()

    got = await subscription.read(10, 0.1)
    assert [d.event["request_id"] for d in got] == [ex.request_id for ex in exchanges[3:]]
    assert metric("llm_proxy_events_dropped_total", reason="queue_full") == before + 3


async def test_waiting_for_room_ends_when_the_pipeline_closes() -> None:
    pipeline = EventPipeline(MemoryBus(), queue_size=1)
    pipeline.submit(exchange(request={}, response=b"{}"))  # never started: the queue stays full
    waiting = asyncio.ensure_future(pipeline.wait_for_room(1, 0))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    closing = asyncio.ensure_future(pipeline.close())
    async with asyncio.timeout(5):
        await waiting
    closing.cancel()
    await asyncio.gather(closing, return_exceptions=True)


async def test_submit_after_close_is_dropped_not_raised() -> None:
    pipeline = await start_event_pipeline(EventsConfig(bus="memory"))
    await pipeline.close()
    pipeline.submit(exchange(request={}, response=b""))
    assert pipeline.dropped == 1


async def test_one_bad_exchange_does_not_cost_the_batch() -> None:
    bad = exchange(request={}, response=b"")

    def flaky_build(ex: Exchange) -> Event:
        if ex is bad:
            raise ValueError("boom")
        return build(ex)

    bus = MemoryBus()
    subscription = bus.subscribe("file", "c1")
    pipeline = EventPipeline(bus, build=flaky_build)
    pipeline.start()
    good = [exchange(request={}, response=b"") for _ in range(2)]
    pipeline.submit(good[0])
    pipeline.submit(bad)
    pipeline.submit(good[1])
    await pipeline.close()
    got = await subscription.read(10, 0.1)
    assert [d.event["request_id"] for d in got] == [ex.request_id for ex in good]


async def test_close_gives_up_after_its_timeout_and_counts_the_rest() -> None:
    def slow_build(ex: Exchange) -> Event:
        time.sleep(0.3)
        return build(ex)

    pipeline = EventPipeline(MemoryBus(), build=slow_build, batch_size=1, close_timeout=0.1)
    pipeline.start()
    for _ in range(4):
        pipeline.submit(exchange(request={}, response=b""))
    started = time.monotonic()
    await pipeline.close()
    assert time.monotonic() - started < 1.0
    assert pipeline.dropped >= 2


async def test_close_counts_the_batch_it_cancels_on_its_way_to_the_bus() -> None:
    def slow_build(ex: Exchange) -> Event:
        time.sleep(0.1)
        return build(ex)

    bus = MemoryBus()
    subscription = bus.subscribe("file", "a")
    pipeline = EventPipeline(bus, build=slow_build, batch_size=4, close_timeout=0.1, linger=0)
    pipeline.start()
    for _ in range(4):
        pipeline.submit(exchange(request={}, response=b""))
    await asyncio.sleep(0)  # the one batch of four leaves the queue for the builder
    await pipeline.close()
    assert await subscription.read(10, 0) == []
    assert (pipeline.published, pipeline.dropped) == (0, 4)


async def test_submit_never_waits() -> None:
    pipeline = await start_event_pipeline(EventsConfig(bus="memory", queue_size=100_000))
    exchanges = [exchange(request={}, response=b"") for _ in range(20_000)]
    started = time.perf_counter()
    for ex in exchanges:
        pipeline.submit(ex)
    per_call = (time.perf_counter() - started) / len(exchanges)
    await pipeline.close()
    assert per_call < 20e-6  # measured about 0.3 µs; generous for slow CI machines


async def test_memory_bus_full_drops_oldest_per_group() -> None:
    before = metric("llm_proxy_events_dropped_total", reason="memory_bus_full")
    bus = MemoryBus(maxlen=2)
    subscription = bus.subscribe("file", "c1")
    events = [build(exchange(request={}, response=b"")) for _ in range(5)]
    await bus.publish(events)
    got = await subscription.read(10, 0.1)
    assert [d.event["id"] for d in got] == [e["id"] for e in events[3:]]
    assert metric("llm_proxy_events_dropped_total", reason="memory_bus_full") == before + 3
    assert await subscription.read(10, 0.05) == []
    assert await bus.ping()
    await subscription.close()
    await bus.close()


async def test_a_waiting_reader_wakes_on_publish() -> None:
    bus = MemoryBus()
    subscription = bus.subscribe("file", "c1")
    reader = asyncio.create_task(subscription.read(10, 5.0))
    await asyncio.sleep(0.01)
    await bus.publish([build(exchange(request={}, response=b""))])
    assert len(await asyncio.wait_for(reader, 1.0)) == 1


async def test_a_read_cancelled_as_events_arrive_is_cancelled_and_leaves_them() -> None:
    # A dispatcher's loop stops by being cancelled: a read that returned its batch instead (as
    # asyncio.wait_for does on Python 3.11 when the two coincide) would keep the loop, and the
    # shutdown awaiting it, going.
    bus = MemoryBus()
    subscription = bus.subscribe("usage", "c1")
    reading = asyncio.create_task(subscription.read(10, 30.0))
    await asyncio.sleep(0)  # the read is waiting
    event = build(exchange(request={"model": "gpt-4o", "messages": []}, response=ANSWER))
    await bus.publish([event])
    reading.cancel()
    await asyncio.gather(reading, return_exceptions=True)
    assert reading.cancelled()
    got = await subscription.read(10, 0.1)
    assert [d.event["request_id"] for d in got] == [event["request_id"]]
