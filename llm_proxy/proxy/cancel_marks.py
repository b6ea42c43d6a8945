"""What the limits' Redis scripts share to give back what a stalled Redis takes late.

A take (a budget hold, an rpm slot) that a Redis runs after its client gave up must take nothing:
the proxy refused that request. So the give-back, when it finds nothing taken yet, marks the id in
a sorted set of cancelled ids (scored by when the mark may be forgotten, Redis's clock), and the
take script looks there first.
"""

from __future__ import annotations


def remember_cancelled(marks_key: str) -> str:
    """Lua that marks ARGV[1] as cancelled in the sorted set ``marks_key`` (``KEYS[n]``) for ARGV[2]
    microseconds, forgetting the marks whose time is past, and returns 0."""
    return f"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZREMRANGEBYSCORE', {marks_key}, '-inf', now)
redis.call('ZADD', {marks_key}, now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', {marks_key}, math.ceil(tonumber(ARGV[2]) / 1000))
return 0
"""
