"""Redis Streams bus: pipelined ``XADD``, a spool file for outages, consumer groups, trimming of
what every group has acknowledged.

Publishing is called by the pipeline's background task, never by the request path. When Redis cannot
be reached the batch goes to the spool file instead, and from then on every event goes there too
until a replay task has copied the spool into the stream: that keeps the stream in publication
order.

Each dispatcher service reads through its own consumer group, so every service sees every event.
Entries are acknowledged by the dispatcher only after its backend accepted them; entries left
pending by a consumer that died are taken over with ``XAUTOCLAIM`` once idle for ``claim_idle``
seconds. Every start names a new consumer, and one that dies (killed, out of memory, a lost node)
never leaves its group itself: the readers of a group delete its consumers that hold nothing and
have not read for ``DEAD_CONSUMER_CLAIM_PERIODS`` times ``claim_idle``.

A publishing bus trims the stream every ``trim_interval`` seconds, in its own task (so it runs while
``XADD`` is refused, a Redis at ``maxmemory``): first what every existing group has acknowledged
(but for the last ``new_group_grace`` seconds of it, kept for a service whose first dispatcher
starts after the servers, unless Redis is refusing entries or the stream is over its cap);
then, only if the stream still holds more than ``maxlen`` entries, the oldest beyond that, read or
not. Those are counted (``llm_proxy_events_dropped_total{reason="trimmed_unacknowledged"}``) and, per
group, the unread ones are written down in a hash that the group's next reader takes, counts and
logs. Groups pin the stream; a stream no group reads is kept to ``maxlen`` entries for the first
dispatcher that comes. The file-log groups of server instances gone for ``gone_group_idle`` seconds
are let go first (see gone_groups.py).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from llm_proxy.events import event as wire
from llm_proxy.events import metrics
from llm_proxy.events.bus import BusKind, BusUnavailable, Delivery
from llm_proxy.events.cancelling import cancel_requested
from llm_proxy.events.event import Event
from llm_proxy.events.gone_groups import GoneGroups
from llm_proxy.events.spool import Spool, SpoolClaim, claim_left, claim_own

log = structlog.get_logger(__name__)

_FIELD = b"e"
_REPLAY_BATCH = 500
_REPLAY_BACKOFF_MAX = 2.0

# One atomic pass, so no reader moves between the computation and the trim. KEYS: the stream, the
# hash of unread entries trimmed per group; ARGV: the cap, the milliseconds of acknowledged entries
# kept for a group yet to be created. Returns the entries trimmed as every
# group had acknowledged them, those trimmed by the cap, how many groups there are, then each group
# that lost unread entries and how many.
_TRIM = """
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function before(a, b)
  local ams, aseq = parse(a)
  local bms, bseq = parse(b)
  return ams < bms or (ams == bms and aseq < bseq)
end
local function fields(list)
  local out = {}
  for i = 1, #list, 2 do out[list[i]] = list[i + 1] end
  return out
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0, 0} end
local groups = {}
local floor = nil
for _, reply in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local group = fields(reply)
  -- Everything up to the last id delivered to the group, unless still pending there.
  local ms, seq = parse(group['last-delivered-id'])
  local keep = string.format('%.0f-%.0f', ms, seq + 1)
  if group['pending'] > 0 then
    local lowest = redis.call('XPENDING', KEYS[1], group['name'])[2]
    if before(lowest, keep) then keep = lowest end
  end
  if floor == nil or before(keep, floor) then floor = keep end
  groups[#groups + 1] = group
end
local acknowledged = 0
local cap = tonumber(ARGV[1])
if floor ~= nil then
  -- What every group acknowledged, but not the last ARGV[2] ms of it (by Redis's clock, which
  -- numbers the entries): a service whose first dispatcher starts a little after the servers
  -- published (started together) finds them there.
  local now = redis.call('TIME')
  local recent = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[2])
  local kept = string.format('%.0f-0', math.max(recent, 0))
  if before(floor, kept) then kept = floor end
  acknowledged = redis.call('XTRIM', KEYS[1], 'MINID', kept)
  -- Over the cap, that courtesy goes first: those entries are read by every group there is.
  if redis.call('XLEN', KEYS[1]) > cap then
    acknowledged = acknowledged + redis.call('XTRIM', KEYS[1], 'MINID', floor)
  end
end
if redis.call('XLEN', KEYS[1]) <= cap then return {acknowledged, 0, #groups} end
local stream = fields(redis.call('XINFO', 'STREAM', KEYS[1]))
local gone_before = stream['entries-added'] - stream['length']
local dropped = redis.call('XTRIM', KEYS[1], 'MAXLEN', cap)
local reply = {acknowledged, dropped, #groups}
local gone = gone_before + dropped
local first = fields(redis.call('XINFO', 'STREAM', KEYS[1]))['recorded-first-entry-id']
for _, group in ipairs(groups) do
  -- Entries are numbered from the stream's first; a group has read those up to 'entries-read'.
  local unread = 0
  local read = group['entries-read']
  if read then
    unread = gone - math.max(read, gone_before)
  elseif before(group['last-delivered-id'], first) then
    unread = dropped  -- its count is unknown to Redis: say all, rather than none
  end
  if unread > 0 then
    reply[#reply + 1] = group['name']
    reply[#reply + 1] = unread
    redis.call('HINCRBY', KEYS[2], group['name'], unread)
    -- Count the trimmed entries as read, or Redis would number the group's next entry (and its
    -- lag) as if they had never been there, and the next cap would count them again.
    redis.call('XGROUP', 'SETID', KEYS[1], group['name'], group['last-delivered-id'],
      'ENTRIESREAD', gone)
  end
end
return reply
"""
# Deletes the consumers of a group that hold nothing and have not read for a while: those of
# processes that died. A script, so that none of them reads (and holds) an entry between the look
# and the delete, which would drop that entry from the group's pending list for good. One deleted
# while alive would only be made again by its next read. KEYS: the stream; ARGV: the group, the
# consumer asking, the idle milliseconds past which one is dead. Returns how many went.
_FORGET_DEAD_CONSUMERS = """
local forgotten = 0
for _, reply in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local consumer = {}
  for i = 1, #reply, 2 do consumer[reply[i]] = reply[i + 1] end
  if consumer['pending'] == 0 and consumer['idle'] > tonumber(ARGV[3])
      and consumer['name'] ~= ARGV[2] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], consumer['name'])
    forgotten = forgotten + 1
  end
end
return forgotten
"""
# A consumer not seen for this many claim_idle periods is not a live one between two reads: a
# live one reads at least every few seconds, or holds the entries it is delivering.
DEAD_CONSUMER_CLAIM_PERIODS = 10
# Takes (reads and deletes) one group's count from that hash. A script, not MULTI: Redis at
# maxmemory refuses every command queued in a transaction, and the count matters most then.
_TAKE = """
local count = redis.call('HGET', KEYS[1], ARGV[1])
if count then redis.call('HDEL', KEYS[1], ARGV[1]) end
return count
"""


class _PartlyAdded(RedisError):
    """Redis refused an entry of a pipelined batch (at maxmemory); ``added`` went in before it."""

    def __init__(self, added: int, refusal: Exception) -> None:
        super().__init__(str(refusal))
        self.added = added


def client_from_url(url: str, *, timeout: float | None) -> Redis:
    """A client that fails fast: no hidden retries, so an outage is seen (and spooled) at once."""
    # TCP keepalive, on TCP only: redis-py's Unix socket connection refuses the option.
    keepalive = {} if urlsplit(url).scheme == "unix" else {"socket_keepalive": True}
    return Redis.from_url(
        url,
        socket_connect_timeout=2.0,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
        **keepalive,
    )


_UNKNOWN_OPTION = re.compile(r"unexpected keyword argument '([^']*)'")


def url_options_problem(url: str) -> str | None:
    """What redis-py refuses in the options of a Redis URL (its query) only once it connects: a
    value that is not one, a name its connection does not take; None when there is nothing.
    Never repeats the URL, which may hold a password."""
    try:
        pool = ConnectionPool.from_url(url)
        pool.connection_class(**pool.connection_kwargs)  # not connected: only built
    except (ValueError, RedisError) as exc:  # "Invalid value for 'db' in connection URL."
        return str(exc)
    except TypeError as exc:
        found = _UNKNOWN_OPTION.search(str(exc))
        name = repr(found.group(1)) if found else "in the query"
        return f"unknown option {name}, not one redis-py takes for this kind of URL"
    return None


def consumer_name() -> str:
    """Unique per process: a restarted dispatcher never takes old pending entries for its own."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class RedisBus:
    kind: BusKind = "redis"

    def __init__(
        self,
        url: str,
        *,
        stream: str = "llm-proxy:events",
        maxlen: int = 100_000,
        spool_path: Path | None = None,
        spool_max_bytes: int | None = None,
        publish_timeout: float = 2.0,
        claim_idle: float = 60.0,
        trim_interval: float = 1.0,
        new_group_grace: float = 60.0,
        gone_group_idle: float = 3600.0,
    ) -> None:
        self.url = url
        self.stream = stream
        self.maxlen = maxlen  # beyond it, entries are trimmed read or not (and counted)
        self.claim_idle = claim_idle
        self.trim_interval = trim_interval
        # Acknowledged entries younger than this stay, for a dispatcher service whose group does
        # not exist yet: started with the servers, it comes a few seconds after their first events.
        self.new_group_grace = new_group_grace
        self.trimmed_unread_key = f"{stream}:trimmed-unread"
        self.client = client_from_url(url, timeout=publish_timeout)
        self._trim_script = self.client.register_script(_TRIM)
        self._gone_groups = GoneGroups(
            self.client, stream, self.trimmed_unread_key, idle=gone_group_idle
        )
        self._trimmer: asyncio.Task[None] | None = None
        self._spool = (
            Spool(spool_path, max_bytes=spool_max_bytes) if spool_path is not None else None
        )
        self._spool_lock = asyncio.Lock()
        self._replayer: asyncio.Task[None] | None = None
        self._subscriptions: set[RedisSubscription] = set()
        # The spool's claim (see spool.py), whether it is a stand-in, and the spools of processes
        # gone that this bus replays.
        self._claim: SpoolClaim | None = None
        self._stand_in = False
        self._left: list[tuple[Spool, SpoolClaim]] = []
        self._left_replayers: set[asyncio.Task[None]] = set()
        # The first entry this bus added (published or replayed from a spool), if any: a group
        # of its own that starts at the next event starts before it (see RedisSubscription).
        self.first_added: str | None = None

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        spool_path: Path | None = None,
        spool_family: str | None = None,
        **options: Any,
    ) -> RedisBus:
        """Create the bus (Redis need not be up yet); resume replaying a spool left by a restart.

        With a ``spool_path``, the bus claims it for this process alone (or a stand-in beside it,
        while another holds it); with a ``spool_family`` (a glob beside it), it also claims and
        replays the spools no live process holds."""
        claim, stand_in = (
            await asyncio.to_thread(claim_own, spool_path)
            if spool_path is not None
            else (None, False)
        )
        bus = cls(url, spool_path=claim.path if claim is not None else None, **options)
        bus._claim, bus._stand_in = claim, stand_in
        if bus._spool is not None and bus._spool.pending:
            log.info("events.spool_replay_resumed", pending_bytes=bus._spool.pending_bytes)
            bus._start_replay()
        if spool_path is not None and spool_family is not None:
            bus._left = await asyncio.to_thread(claim_left, spool_path, spool_family)
            for spool, _ in bus._left:
                log.info(
                    "events.left_spool_claimed",
                    path=str(spool.path),
                    pending_bytes=spool.pending_bytes,
                )
                task = asyncio.get_running_loop().create_task(bus._replay(spool, asyncio.Lock()))
                bus._left_replayers.add(task)
        bus._trimmer = asyncio.get_running_loop().create_task(bus._trim_periodically())
        return bus

    async def trim(self) -> None:
        """Trim what every group has acknowledged, then anything beyond ``maxlen``, counted."""
        reply: Any = await self._trim_script(
            keys=[self.stream, self.trimmed_unread_key],
            # Not while Redis refuses entries (at maxmemory): then what was read must go at once.
            args=[self.maxlen, 0 if self.spooling else int(self.new_group_grace * 1000)],
        )
        acknowledged, dropped, groups = (int(n) for n in reply[:3])
        metrics.TRIMMED.labels("acknowledged").inc(acknowledged)
        if not dropped:
            return
        if groups:
            metrics.DROPPED.labels("trimmed_unacknowledged").inc(dropped)
            behind = dict(zip(reply[3::2], reply[4::2], strict=True))
            log.error(
                "events.redis_unacknowledged_trimmed",
                count=dropped,
                maxlen=self.maxlen,
                unread={name.decode(): int(n) for name, n in behind.items()},
                action="start the dispatcher services named, or delete the consumer group of "
                "one no longer used (XGROUP DESTROY); a server's own file@ group goes by itself "
                "once unread for EVENTS_FILE_GROUP_IDLE",
            )
        else:
            metrics.TRIMMED.labels("no_group").inc(dropped)

    async def _trim_periodically(self) -> None:
        failures = 0
        # Far less often than trimming: the groups it looks for have been idle for a long while.
        # Never before Redis has been reachable that long, after this start or an outage: a
        # consumer's idle time counts the outage too (and a whole fleet's stop), so the live
        # instances must have had the time to read again first.
        release_every = max(self.trim_interval, min(self._gone_groups.idle / 4, 60.0))
        next_release = time.monotonic() + release_every
        while not cancel_requested():  # (a trim may swallow the cancellation: see cancelling.py)
            await asyncio.sleep(self.trim_interval)
            try:
                await self.trim()
                if time.monotonic() >= next_release:
                    await self._gone_groups.release()
                    next_release = time.monotonic() + release_every
                failures = 0
            except (RedisError, OSError) as exc:  # an outage: publishing says so already
                next_release = time.monotonic() + release_every
                failures += 1
                if failures == 1:
                    log.warning("events.redis_trim_failed", error=str(exc))
            except Exception:  # a task boundary: a stream never trimmed again would fill Redis
                log.exception("events.redis_trim_failed")

    @property
    def spooling(self) -> bool:
        return self._spool is not None and self._spool.pending

    async def _xadd(self, events: Sequence[Event]) -> None:
        written, unwritable = wire.dumps_each(events)
        metrics.count_unwritable(unwritable, "redis")
        if not written:
            return
        pipe = self.client.pipeline(transaction=False)
        for data in written:
            pipe.xadd(self.stream, {_FIELD: data})
        results = await pipe.execute(raise_on_error=False)
        added = next((i for i, r in enumerate(results) if isinstance(r, Exception)), len(results))
        metrics.PUBLISHED.labels("redis").inc(added)
        if added and self.first_added is None:
            self.first_added = results[0].decode()
        if added < len(results):
            # How many of ``events`` are done with: those added, and the unwritable ones among
            # them (dropped above, wherever they stood).
            taken = wire.positions_taken(events, len(unwritable), added)
            raise _PartlyAdded(taken, results[added])

    async def publish(self, events: Sequence[Event]) -> None:
        if not events:
            return
        if self._spool is not None and self._spool.pending:
            await self._to_spool(events)
            return
        try:
            await self._xadd(events)
        except (RedisError, OSError) as exc:
            if isinstance(exc, _PartlyAdded):
                events = events[exc.added :]  # those are in the stream: no duplicates
            if self._spool is None:
                metrics.DROPPED.labels("redis_unavailable").inc(len(events))
                log.error("events.redis_unavailable_dropped", count=len(events), error=str(exc))
                return
            log.warning("events.redis_unavailable_spooled", error=str(exc))
            await self._to_spool(events)

    async def _to_spool(self, events: Sequence[Event]) -> None:
        assert self._spool is not None
        async with self._spool_lock:
            await asyncio.to_thread(self._spool.append, events)
        self._start_replay()

    def _start_replay(self) -> None:
        assert self._spool is not None
        if self._replayer is None or self._replayer.done():
            self._replayer = asyncio.get_running_loop().create_task(
                self._replay(self._spool, self._spool_lock)
            )

    async def _replay(self, spool: Spool, lock: asyncio.Lock) -> None:
        delay = 0.05
        replayed = 0
        batch: tuple[list[Event], int] | None = None
        while True:
            if batch is None:
                async with lock:
                    if not spool.pending:
                        break
                    batch = await asyncio.to_thread(spool.read, _REPLAY_BATCH)
            events, offset = batch
            try:
                if events:
                    await self._xadd(events)
            except (RedisError, OSError) as exc:
                if isinstance(exc, _PartlyAdded) and exc.added:
                    # Keep what went in: sent again it would be a duplicate, and a batch bigger
                    # than the room Redis has left would never go in whole.
                    async with lock:
                        _, done = await asyncio.to_thread(spool.read, exc.added)
                        await asyncio.to_thread(spool.advance, done)
                    replayed += exc.added
                    metrics.REPLAYED.inc(exc.added)
                    batch = None
                    delay = 0.05  # room is made as dispatchers catch up: look again soon
                await asyncio.sleep(delay)  # still down: try the same batch again
                delay = min(delay * 2, _REPLAY_BACKOFF_MAX)
                continue
            delay = 0.05
            async with lock:
                await asyncio.to_thread(spool.advance, offset)
            batch = None
            replayed += len(events)
            metrics.REPLAYED.inc(len(events))
        log.info("events.spool_replayed", events=replayed, path=str(spool.path))

    def subscribe(self, group: str, consumer: str, *, from_start: bool = True) -> RedisSubscription:
        subscription = RedisSubscription(self, group, consumer, from_start=from_start)
        self._subscriptions.add(subscription)
        return subscription

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        """Stop replaying (the spools stay on disk for the next start), let go of them and close
        connections."""
        replayers = [
            *self._left_replayers,
            *(task for task in (self._replayer, self._trimmer) if task is not None),
        ]
        for task in replayers:
            task.cancel()
        await asyncio.gather(*replayers, return_exceptions=True)
        for _, claim in self._left:
            claim.release()
        self._left = []
        if self._claim is not None:
            if self._stand_in and self._spool is not None and not self._spool.pending:
                self._spool.discard()
            self._claim.release()
            self._claim = None
        for subscription in list(self._subscriptions):
            await subscription.close()
        await self.client.aclose()


def _just_before(entry_id: str) -> str:
    """The stream id just before ``entry_id`` (a group created there reads from it on)."""
    ms, seq = (int(part) for part in entry_id.split("-"))
    if seq:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-{2**64 - 1}" if ms else "0-0"


class RedisSubscription:
    """One consumer in a consumer group; blocking reads use their own connection."""

    def __init__(
        self, bus: RedisBus, group: str, consumer: str, *, from_start: bool = True
    ) -> None:
        self._bus = bus
        self.group = group
        self.consumer = consumer
        self._start_id = "0" if from_start else "$"
        # No socket timeout: XREADGROUP BLOCK would trip it. ``read`` bounds the wait itself.
        self._client = client_from_url(bus.url, timeout=None)
        self._take_script = self._client.register_script(_TAKE)
        self._forget_script = self._client.register_script(_FORGET_DEAD_CONSUMERS)
        self._group_ready = False
        self._claim_cursor: Any = "0-0"
        self._next_claim = 0.0
        self.lost = 0

    async def _ensure_group(self) -> None:
        start = self._start_id
        if start == "$" and self._bus.first_added is not None:
            # From the next event, but not after those this process published before the group
            # could be made (Redis was down, the spool was replayed first): they came after the
            # subscription, and nothing else would ever deliver them to this group.
            start = _just_before(self._bus.first_added)
        try:
            # From "0": a service's first dispatcher also gets the events already in the stream.
            await self._client.xgroup_create(self._bus.stream, self.group, id=start, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        else:  # a new group, which lost nothing: not what an old one of its name did
            await self._client.hdel(self._bus.trimmed_unread_key, self.group)
        self._group_ready = True

    def _deliveries(
        self, entries: Sequence[Any], redelivered: bool
    ) -> tuple[list[Delivery], list[str]]:
        deliveries: list[Delivery] = []
        unusable: list[str] = []
        for entry_id, fields in entries:
            entry = entry_id.decode()
            try:
                deliveries.append(Delivery(entry, wire.loads(fields[_FIELD]), redelivered))
            except (KeyError, TypeError, ValueError):
                unusable.append(entry)
        return deliveries, unusable

    async def read(self, count: int, wait: float) -> list[Delivery]:
        try:
            async with asyncio.timeout(wait + 10.0):
                return await self._read(count, wait)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                # The stream or group vanished (Redis restarted without persistence, or someone
                # deleted it): what it had not delivered is gone, how much no one can tell. Say so,
                # then recreate it from the start of the new stream, which holds nothing it had.
                self.lost += 1
                metrics.GROUPS_LOST.inc()
                log.error(
                    "events.redis_group_lost",
                    group=self.group,
                    stream=self._bus.stream,
                    action="events this group had not delivered are lost; run Redis with "
                    "persistence (appendonly yes) for the event bus",
                )
                self._group_ready = False
                self._start_id = "0"
                return []
            raise BusUnavailable(str(exc)) from exc
        except (RedisError, OSError, TimeoutError) as exc:
            raise BusUnavailable(str(exc) or type(exc).__name__) from exc

    async def _read(self, count: int, wait: float) -> list[Delivery]:
        if not self._group_ready:
            await self._ensure_group()
        await self._take_trimmed_unread()
        if time.monotonic() >= self._next_claim:
            deliveries = await self._claim(count)
            if deliveries:
                return deliveries
        response: Any = await self._client.xreadgroup(
            self.group,
            self.consumer,
            {self._bus.stream: ">"},
            count=count,
            block=max(1, int(wait * 1000)),
        )
        if not response:
            return []
        deliveries, unusable = self._deliveries(response[0][1], redelivered=False)
        await self._drop(unusable, "bus_entry_unusable")
        return deliveries

    async def _claim(self, count: int) -> list[Delivery]:
        reply = await self._client.xautoclaim(
            self._bus.stream,
            self.group,
            self.consumer,
            min_idle_time=int(self._bus.claim_idle * 1000),
            start_id=self._claim_cursor,
            count=count,
        )
        self._claim_cursor, entries = reply[0], reply[1]
        if self._claim_cursor in (b"0-0", "0-0"):
            # A full pass over the pending list: look again after a while, not on every read.
            self._next_claim = time.monotonic() + min(self._bus.claim_idle / 2, 5.0)
            await self._forget_dead_consumers()
        # Entries trimmed from the stream while pending come back as ids only: nothing to deliver.
        gone = [i.decode() for i in reply[2]] if len(reply) > 2 else []
        deliveries, unusable = self._deliveries(entries, redelivered=True)
        await self._drop(unusable, "bus_entry_unusable")
        await self._drop(gone, "trimmed_before_delivery")
        if deliveries:
            log.info("events.redis_pending_reclaimed", group=self.group, count=len(deliveries))
        return deliveries

    async def _forget_dead_consumers(self) -> None:
        """Delete the group's consumers left by processes that died, once what they held was
        taken over: otherwise a group keeps one per crashed run for good."""
        dead_after = self._bus.claim_idle * DEAD_CONSUMER_CLAIM_PERIODS
        forgotten = await self._forget_script(
            keys=[self._bus.stream], args=[self.group, self.consumer, int(dead_after * 1000)]
        )
        if forgotten:
            log.info(
                "events.redis_dead_consumers_forgotten",
                group=self.group,
                count=int(forgotten),
                idle_seconds=dead_after,
            )

    async def _take_trimmed_unread(self) -> None:
        """Count the entries that the stream's cap trimmed before this group read them, as the
        trimming bus wrote down: XREADGROUP skips them without a word."""
        taken = await self._take_script(keys=[self._bus.trimmed_unread_key], args=[self.group])
        if taken:
            count = int(taken)
            self.lost += count
            metrics.DROPPED.labels("trimmed_before_delivery").inc(count)
            log.error(
                "events.redis_unread_entries_trimmed",
                group=self.group,
                count=count,
                action="the stream's length cap trimmed them while this service was behind",
            )

    async def _drop(self, ids: list[str], reason: str) -> None:
        if ids:
            if reason == "trimmed_before_delivery":
                self.lost += len(ids)
            metrics.DROPPED.labels(reason).inc(len(ids))
            log.error(
                "events.redis_entries_dropped", group=self.group, count=len(ids), reason=reason
            )
            await self._client.xack(self._bus.stream, self.group, *ids)

    async def ack(self, ids: Sequence[str]) -> None:
        if not ids:
            return
        try:
            await self._client.xack(self._bus.stream, self.group, *ids)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):  # with the group gone, so are its pending entries
                raise BusUnavailable(str(exc)) from exc
        except (RedisError, OSError) as exc:
            raise BusUnavailable(str(exc) or type(exc).__name__) from exc

    @property
    def keep_every(self) -> float | None:
        # Well within claim_idle, after which another consumer would take them over.
        return self._bus.claim_idle / 3

    async def keep(self, ids: Sequence[str]) -> None:
        """Reset the idle time of these pending entries (XCLAIM to this consumer, JUSTID), so
        that a slow or retried delivery is not taken for a dead consumer's."""
        if not ids:
            return
        try:
            await self._client.xclaim(
                self._bus.stream, self.group, self.consumer, 0, list(ids), justid=True
            )
        except (RedisError, OSError) as exc:
            raise BusUnavailable(str(exc) or type(exc).__name__) from exc

    async def close(self) -> None:
        self._bus._subscriptions.discard(self)
        try:
            if self._group_ready:
                # A consumer that holds nothing leaves the group: every start names a new one, so
                # otherwise a group keeps one per run for good (a cron --burst: one a minute).
                # One holding entries stays, for another dispatcher to claim them.
                async with asyncio.timeout(2.0):
                    holds = await self._client.xpending_range(
                        self._bus.stream, self.group, "-", "+", 1, consumername=self.consumer
                    )
                    if not holds:
                        await self._client.xgroup_delconsumer(
                            self._bus.stream, self.group, self.consumer
                        )
        except (RedisError, OSError, TimeoutError):
            pass  # the name stays in the group until its other readers find it dead
        finally:
            await self._client.aclose()
