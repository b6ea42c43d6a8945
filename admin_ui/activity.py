"""Usage over time, for the charts: the last 24 hours by hour and the last 30 days by day.

Read from the hourly usage aggregates (``usage_hourly``, written by the events pipeline shortly
after each request), so a chart counts what the usage figures beside it count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from markupsafe import Markup

from admin_ui.charts import Point, Series, count_text, render, short_count, short_dollars
from admin_ui.rendering import dollars
from llm_proxy.models import UsageTotals, hour_start
from llm_proxy.store import Store

HOURS = 24
EN_DASH = "\u2013"  # between the ends of a range of hours
DAYS = 30


@dataclass(frozen=True, slots=True)
class Bucket:
    key: str  # its start, ``2030-05-01T14:00Z``
    label: str  # under a chart's axis
    span: str  # in tooltips and the figures table
    totals: UsageTotals


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    name: str  # ``Requests``: the chart is "<name> per hour"
    noun: str
    empty: str  # across an empty chart: "No requests"
    value: Callable[[UsageTotals], int]
    value_text: Callable[[int], str]
    tick_text: Callable[[int], str]


METRICS = (
    Metric(
        "requests",
        "Requests",
        "requests",
        "No requests",
        lambda t: t.requests,
        count_text,
        short_count,
    ),
    Metric(
        "tokens",
        "Tokens",
        "tokens",
        "No tokens used",
        lambda t: t.total_tokens,
        count_text,
        short_count,
    ),
    Metric("errors", "Errors", "errors", "No errors", lambda t: t.errors, count_text, short_count),
    Metric("spend", "Spend", "spent", "No spend", lambda t: t.cost_nanousd, dollars, short_dollars),
)


@dataclass(frozen=True, slots=True)
class Timeline:
    """One stretch of time, bucketed: its charts and the figures under them."""

    key: str  # ``24h``, ``30d``
    heading: str  # ``Last 24 hours, by hour``
    column: str  # the bucket column of the figures table
    buckets: tuple[Bucket, ...]
    charts: tuple[Markup, ...]


def _plus(a: UsageTotals, b: UsageTotals) -> UsageTotals:
    latest = max((t for t in (a.last_used_at, b.last_used_at) if t is not None), default=None)
    return UsageTotals(
        requests=a.requests + b.requests,
        prompt_tokens=a.prompt_tokens + b.prompt_tokens,
        completion_tokens=a.completion_tokens + b.completion_tokens,
        total_tokens=a.total_tokens + b.total_tokens,
        errors=a.errors + b.errors,
        last_used_at=latest,
        cost_nanousd=a.cost_nanousd + b.cost_nanousd,
    )


def _hour_bucket(start: datetime, totals: UsageTotals) -> Bucket:
    end = start + timedelta(hours=1)
    return Bucket(
        key=start.strftime("%Y-%m-%dT%H:%MZ"),
        label=start.strftime("%H:%M"),
        span=f"{start:%b} {start.day}, {start:%H:%M}{EN_DASH}{end:%H:%M} UTC",
        totals=totals,
    )


def _day_bucket(start: datetime, totals: UsageTotals) -> Bucket:
    return Bucket(
        key=start.strftime("%Y-%m-%dT%H:%MZ"),
        label=f"{start:%b} {start.day}",
        span=f"{start:%a} {start:%b} {start.day}, {start.year} (UTC)",
        totals=totals,
    )


def _charts(key: str, unit: str, period: str, buckets: tuple[Bucket, ...], every: int) -> Timeline:
    charts = tuple(
        render(
            Series(
                metric=metric.key,
                title=f"{metric.name} per {unit}",
                period=period,
                noun=metric.noun,
                empty=metric.empty,
                axis=f"{unit} (UTC)",
                points=tuple(
                    Point(b.key, b.label, b.span, metric.value(b.totals)) for b in buckets
                ),
                value_text=metric.value_text,
                tick_text=metric.tick_text,
                label_every=every,
            ),
            f"chart-{key}-{metric.key}",
        )
        for metric in METRICS
    )
    return Timeline(
        key=key,
        heading=f"{period[0].upper()}{period[1:]}, by {unit}",
        column=f"{unit.capitalize()} (UTC)",
        buckets=buckets,
        charts=charts,
    )


def bucket_usage(
    rows: list[tuple[datetime, UsageTotals]], now: datetime
) -> tuple[tuple[Bucket, ...], tuple[Bucket, ...]]:
    """The hours of the last 24 (this one included) and the days of the last 30 (today
    included), oldest first, each with its usage; buckets without any are zero."""
    this_hour = hour_start(now)
    today = this_hour.replace(hour=0)
    by_hour: dict[datetime, UsageTotals] = {}
    by_day: dict[datetime, UsageTotals] = {}
    for start, totals in rows:
        by_hour[start] = _plus(by_hour.get(start, UsageTotals()), totals)
        day = hour_start(start).replace(hour=0)
        by_day[day] = _plus(by_day.get(day, UsageTotals()), totals)
    hours = (this_hour - timedelta(hours=n) for n in range(HOURS - 1, -1, -1))
    days = (today - timedelta(days=n) for n in range(DAYS - 1, -1, -1))
    return (
        tuple(_hour_bucket(h, by_hour.get(h, UsageTotals())) for h in hours),
        tuple(_day_bucket(d, by_day.get(d, UsageTotals())) for d in days),
    )


async def timelines(
    store: Store,
    now: datetime,
    *,
    project_id: str | None = None,
    token_id: str | None = None,
) -> tuple[Timeline, Timeline]:
    """Charts of everything, of one project or of one token: by hour, then by day."""
    since = hour_start(now).replace(hour=0) - timedelta(days=DAYS - 1)
    rows = await store.usage_by_hour(since, project_id=project_id, token_id=token_id)
    hours, days = bucket_usage(rows, now)
    return (
        _charts("24h", "hour", f"last {HOURS} hours", hours, every=6),
        _charts("30d", "day", f"last {DAYS} days", days, every=7),
    )
