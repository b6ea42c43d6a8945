"""A report as a rich table: one column per route and, when comparing, the difference."""

from __future__ import annotations

from rich.table import Table

from llm_proxy.tools.benchmark.results import Added, BenchmarkReport, Delta, Summary


def _cell(summary: Summary | None, key: str) -> str:
    return "—" if summary is None else f"{getattr(summary, key):.3f} ms"


def _delta_cell(delta: Delta | None, key: str) -> str:
    return "" if delta is None else f"{getattr(delta, key):+.3f} ms"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind}: {n}" for kind, n in counts.items()) or "none"


def render_report(report: BenchmarkReport) -> Table:
    """The report as a table: one column per route and, when comparing, the difference."""
    config = report.config
    size = f"{config['requests']} requests" if config["requests"] else f"{config['duration']} s"
    table = Table(
        title=f"{config['method']} {config['endpoint']}",
        caption=f"concurrency {config['concurrency']}, {size} per route"
        + (", streamed" if config["stream"] else "")
        + (", interrupted: the figures so far" if report.interrupted else ""),
    )
    routes = [report.proxy] if report.direct is None else [report.proxy, report.direct]
    table.add_column("")
    for title in ("proxy", "direct") if report.direct is not None else ("result",):
        table.add_column(title, justify="right")
    if report.added is not None:
        table.add_column("added", justify="right")

    def row(label: str, cells: list[str], added: str = "") -> None:
        table.add_row(label, *cells, *([added] if report.added is not None else []))

    row("requests", [str(route.requests) for route in routes])
    row("status", [_counts(route.status) for route in routes])
    row("errors", [_counts(route.errors) for route in routes])
    row("new connections", [str(route.connections) for route in routes])
    if report.throughput is None:
        row("2xx/s", [f"{route.requests_per_second:,.1f}" for route in routes])
    added = report.added or Added(None, None)
    figures: list[tuple[str, str, Delta | None, tuple[str, ...]]] = [
        ("latency", "latency_ms", added.latency_ms, ("p50", "p90", "p99")),
        ("headers", "headers_ms", None, ("p50", "p99")),
        ("first byte", "ttfb_ms", added.ttfb_ms, ("p50", "p90", "p99")),
    ]
    if config["stream"]:
        figures.append(("inter-chunk", "inter_chunk_ms", None, ("p50", "p99", "max")))
    for label, name, delta, keys in figures:
        for key in keys:
            summaries = [getattr(route, name) for route in routes]
            row(f"{label} {key}", [_cell(s, key) for s in summaries], _delta_cell(delta, key))
        if name == "latency_ms":
            row("latency max", [_cell(route.latency_ms, "max") for route in routes])
    names = sorted({name for route in routes for name in route.server_timing_ms})
    for name in names:
        for key in ("p50", "p99"):
            cells = [_cell(route.server_timing_ms.get(name), key) for route in routes]
            row(f"server-timing {name} {key}", cells)
    if report.throughput is not None:
        alone = [report.throughput.proxy, report.throughput.direct]
        ratio = report.throughput.ratio
        row(
            "2xx/s, each alone",
            [f"{route.requests_per_second:,.1f}" for route in alone],
            "—" if ratio is None else f"{ratio:.1%} of direct",
        )
        row("errors, each alone", [_counts(route.errors) for route in alone])
    return table
