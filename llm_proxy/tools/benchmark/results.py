"""The records a run produces; ``orjson.dumps`` of a ``BenchmarkReport`` is the ``--json`` document."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Summary:
    """A distribution in milliseconds."""

    count: int
    min: float
    mean: float
    p50: float
    p90: float
    p99: float
    max: float


@dataclass(frozen=True, slots=True)
class Delta:
    """How much slower one route is than another, percentile by percentile, in milliseconds."""

    p50: float
    p90: float
    p99: float

    @classmethod
    def between(cls, slow: Summary | None, fast: Summary | None) -> Delta | None:
        if slow is None or fast is None:
            return None
        return cls(
            round(slow.p50 - fast.p50, 3),
            round(slow.p90 - fast.p90, 3),
            round(slow.p99 - fast.p99, 3),
        )


@dataclass(frozen=True, slots=True)
class RouteStats:
    """What one route did in one phase. Timings cover 2xx responses only."""

    url: str
    requests: int
    succeeded: int
    failed: int
    connections: int
    seconds: float
    requests_per_second: float  # 2xx responses per second
    status: dict[str, int]
    errors: dict[str, int]  # non-2xx by status code, transport failures by exception name
    latency_ms: Summary | None
    headers_ms: Summary | None
    ttfb_ms: Summary | None
    inter_chunk_ms: Summary | None
    server_timing_ms: dict[str, Summary]


@dataclass(frozen=True, slots=True)
class Added:
    """What the proxy adds over the direct route: proxy percentiles minus direct percentiles."""

    latency_ms: Delta | None
    ttfb_ms: Delta | None


@dataclass(frozen=True, slots=True)
class Throughput:
    """Each route run alone, back to back, at the configured concurrency."""

    proxy: RouteStats
    direct: RouteStats
    ratio: float | None  # proxy requests/s over direct requests/s


@dataclass(frozen=True, slots=True)
class BenchmarkReport:
    """Everything measured; ``orjson.dumps`` turns it into the ``--json`` document."""

    config: dict[str, object]
    proxy: RouteStats
    direct: RouteStats | None = None
    added: Added | None = None
    throughput: Throughput | None = None
    interrupted: bool = False  # stopped by Ctrl-C: the figures cover the run until then

    @property
    def all_failed(self) -> bool:
        routes = [self.proxy, self.direct]
        if self.throughput is not None:
            routes += [self.throughput.proxy, self.throughput.direct]
        return not any(route.succeeded for route in routes if route is not None)
