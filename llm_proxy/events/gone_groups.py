"""Letting go of the consumer groups of server instances that are gone.

``llm-proxy server --file-event-log PATH`` reads the Redis stream in a group of its own,
``file@<host>:<absolute path>``. A container's host name changes with every new container, so each
one replaced leaves a group no one reads again; and the stream is trimmed only of what every group
acknowledged, so such a group pins it until the cap trims it (counted and logged as lost, every
second, for ever) although no one is missing anything.

A group of that kind is taken for gone once nothing has read it for ``idle`` seconds: none of its
consumers (a killed instance leaves its own, a stopped one none) has been seen by Redis for that
long, and the oldest entry it has not acknowledged is that old too (so a group between two runs of
an instance that was behind is not taken for one). A consumer is seen when it is handed entries or
keeps those it holds (``XCLAIM``, every third of ``claim_idle`` while a batch is being delivered);
before Redis 7.2 a read that finds nothing does not count, but then the group holds nothing back
either. So ``idle`` must stay well above a third of ``claim_idle``. The group is deleted, logged with the entries it had not
acknowledged, and those are counted as dropped. Groups of dispatcher services (``file``,
``helicone``, ...) are never touched: a service down for hours gets every event when it is back.
"""

from __future__ import annotations

from typing import Any

import structlog
from redis.asyncio import Redis

from llm_proxy.events import metrics

log = structlog.get_logger(__name__)

# The name of every group a server's own file log reads in (dispatcher/embedded.py): one per
# instance, never a dispatcher service's.
INSTANCE_GROUP_PREFIX = "file@"

# One atomic pass, so that no reader joins a group between the look and the delete. KEYS: the
# stream, the hash of unread entries trimmed per group; ARGV: the group name prefix, the idle
# milliseconds. Returns each group deleted and how many entries it had not acknowledged.
_RELEASE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local function fields(list)
  local out = {}
  for i = 1, #list, 2 do out[list[i]] = list[i + 1] end
  return out
end
local function millis(id) return tonumber(string.match(id, '^(%d+)-')) end
local now = redis.call('TIME')
local before = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[2])
local released = {}
for _, reply in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local group = fields(reply)
  local name = group['name']
  if string.sub(name, 1, #ARGV[1]) == ARGV[1] then
    local read_lately = false
    for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], name)) do
      if fields(c)['idle'] <= tonumber(ARGV[2]) then read_lately = true end
    end
    -- The oldest entry the group holds back: its oldest pending, else its first undelivered.
    local oldest = nil
    if group['pending'] > 0 then
      oldest = redis.call('XPENDING', KEYS[1], name)[2]
    else
      local next = redis.call('XRANGE', KEYS[1], '(' .. group['last-delivered-id'], '+', 'COUNT', 1)
      if #next > 0 then oldest = next[1][1] end
    end
    -- A group that holds nothing back pins nothing: it stays until it does.
    if not read_lately and oldest ~= nil and millis(oldest) < before then
      local unacknowledged = redis.call('XLEN', KEYS[1])  -- its lag unknown: say all
      if group['lag'] then unacknowledged = group['lag'] + group['pending'] end
      redis.call('XGROUP', 'DESTROY', KEYS[1], name)
      redis.call('HDEL', KEYS[2], name)
      released[#released + 1] = name
      released[#released + 1] = unacknowledged
    end
  end
end
return released
"""


class GoneGroups:
    """Deletes the file-log groups of instances gone for ``idle`` seconds (see the module)."""

    def __init__(self, client: Redis, stream: str, trimmed_unread_key: str, idle: float) -> None:
        self._script = client.register_script(_RELEASE)
        self._keys = [stream, trimmed_unread_key]
        self.idle = idle

    async def release(self) -> int:
        """One pass; returns how many groups went."""
        reply: Any = await self._script(
            keys=self._keys, args=[INSTANCE_GROUP_PREFIX, int(self.idle * 1000)]
        )
        for name, unacknowledged in zip(reply[::2], reply[1::2], strict=True):
            count = int(unacknowledged)
            metrics.DROPPED.labels("instance_group_released").inc(count)
            log.warning(
                "events.redis_gone_instance_group_released",
                group=name.decode(),
                unacknowledged=count,
                idle_seconds=self.idle,
                reason="no reader for that long: its instance is gone",
            )
        return len(reply) // 2
