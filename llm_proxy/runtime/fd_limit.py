"""Raise the open-file limit to what the host allows, once, at start.

Every open stream holds two descriptors (the client's connection and the upstream's), so the soft
limit many hosts start processes with (1,024) would refuse new connections at about 500
concurrent streams while the hard limit allows far more. Go's runtime and nginx's
``worker_rlimit_nofile`` do the same: the soft limit goes up to the hard one, never beyond.
"""

from __future__ import annotations

import resource

import structlog

log = structlog.get_logger(__name__)

# Below this many descriptors, a few hundred streams exhaust them: worth a warning at start.
LOW_LIMIT = 4096


def raise_open_file_limit() -> None:
    """Set the soft RLIMIT_NOFILE to the hard one (warn when even that is low)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit still stops at the kernel's nr_open (2^20 by default).
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # a sandbox may refuse; the start goes on
            log.warning("server.open_file_limit_unchanged", soft=soft, hard=hard, error=str(exc))
    if soft != resource.RLIM_INFINITY and soft < LOW_LIMIT:
        log.warning(
            "server.open_file_limit_low",
            limit=soft,
            concurrent_streams=soft // 2,
            hint="raise the hard limit (ulimit -Hn, LimitNOFILE=, --ulimit nofile=)",
        )
