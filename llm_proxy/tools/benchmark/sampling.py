"""Samples into distributions: HdrHistograms per timing, and the recorder of one route in one phase."""

from __future__ import annotations

import contextlib
import re
from collections import Counter

from hdrh.histogram import HdrHistogram

from llm_proxy.tools.benchmark.client import Connection
from llm_proxy.tools.benchmark.results import RouteStats, Summary

_MAX_US = 600_000_000  # longer samples are clamped: a benchmark request that long is lost anyway
# Each metric name holds a histogram of its own: a server that names metrics after requests would
# otherwise grow the run, and its table, without bound. Later names are not recorded.
MAX_SERVER_TIMING_METRICS = 32


def _split(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` outside quoted strings (a ``desc`` may hold either)."""
    if '"' not in text:
        return text.split(separator)  # the usual header, the proxy's own: no regex per response
    return re.findall(rf'(?:[^{separator}"]|"[^"]*")+', text) or [""]


def parse_server_timing(header: str) -> list[tuple[str, float]]:
    """``proxy;dur=0.041, upstream;desc="x";dur=1.2`` → ``[("proxy", 0.041), ("upstream", 1.2)]``."""
    metrics = []
    for entry in _split(header, ","):
        name, *params = _split(entry, ";")
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() != "dur":
                continue
            with contextlib.suppress(ValueError):
                metrics.append((name.strip(), float(value.strip().strip('"'))))
            break
    return metrics


def _ms(microseconds: float) -> float:
    return round(microseconds / 1000, 3)


class Samples:
    """An HdrHistogram plus the running total, because hdrh's own mean walks every bucket."""

    __slots__ = ("histogram", "total")

    def __init__(self) -> None:
        self.histogram = HdrHistogram(1, _MAX_US, 3)
        self.total = 0

    def add(self, seconds: float) -> None:
        microseconds = min(max(round(seconds * 1e6), 0), _MAX_US)
        self.histogram.record_value(microseconds)
        self.total += microseconds

    def summary(self) -> Summary | None:
        histogram = self.histogram
        count = histogram.get_total_count()
        if not count:
            return None
        at = histogram.get_percentile_to_value_dict([50, 90, 99])
        return Summary(
            count,
            _ms(histogram.get_min_value()),
            _ms(self.total / count),
            _ms(at[50]),
            _ms(at[90]),
            _ms(at[99]),
            _ms(histogram.get_max_value()),
        )


class Recorder:
    """Samples of one route in one phase."""

    def __init__(self, stream: bool) -> None:
        self.latency = Samples()
        self.headers = Samples()
        self.ttfb = Samples()
        self.gaps = Samples() if stream else None
        self.server_timing: dict[str, Samples] = {}
        self.status: Counter[int] = Counter()
        self.errors: Counter[int | str] = Counter()
        self.requests = self.succeeded = self.connections = 0

    def response(self, conn: Connection, started: float) -> None:
        self.requests += 1
        status = conn.status
        self.status[status] += 1
        if not 200 <= status < 300:
            self.errors[status] += 1
            return
        self.succeeded += 1
        self.latency.add(conn.end_at - started)
        self.headers.add(conn.headers_at - started)
        if conn.first_body_at:
            self.ttfb.add(conn.first_body_at - started)
        if self.gaps is not None:
            for before, after in zip(conn.chunk_times, conn.chunk_times[1:], strict=False):
                self.gaps.add(after - before)
        for header in conn.server_timing:
            for name, duration_ms in parse_server_timing(header.decode("latin-1")):
                samples = self.server_timing.get(name)
                if samples is None:
                    if len(self.server_timing) >= MAX_SERVER_TIMING_METRICS:
                        continue
                    samples = self.server_timing[name] = Samples()
                samples.add(duration_ms / 1000)

    def failure(self, exc: BaseException) -> None:
        self.requests += 1
        self.errors[type(exc).__name__] += 1

    def stats(self, url: str, seconds: float) -> RouteStats:
        return RouteStats(
            url=url,
            requests=self.requests,
            succeeded=self.succeeded,
            failed=self.requests - self.succeeded,
            connections=self.connections,
            seconds=round(seconds, 6),
            requests_per_second=round(self.succeeded / seconds, 3) if seconds > 0 else 0.0,
            status={str(code): n for code, n in sorted(self.status.items())},
            errors={str(kind): n for kind, n in self.errors.most_common()},
            latency_ms=self.latency.summary(),
            headers_ms=self.headers.summary(),
            ttfb_ms=self.ttfb.summary(),
            inter_chunk_ms=None if self.gaps is None else self.gaps.summary(),
            server_timing_ms={
                name: summary
                for name, samples in sorted(self.server_timing.items())
                if (summary := samples.summary()) is not None
            },
        )
