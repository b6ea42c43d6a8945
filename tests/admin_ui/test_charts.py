"""The SVG bar charts: their geometry as numbers, and markup that needs no script or inline style."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime

import pytest

from admin_ui.activity import bucket_usage
from admin_ui.charts import (
    Point,
    Series,
    Size,
    count_text,
    layout,
    nice_ticks,
    render,
    short_count,
    short_dollars,
)
from llm_proxy.models import UsageTotals

SVG = "{http://www.w3.org/2000/svg}"
SIZE = Size()


def points(*values: int) -> tuple[Point, ...]:
    return tuple(
        Point(f"2030-05-01T{n:02d}:00Z", f"{n:02d}:00", f"May 1, {n:02d}:00 UTC", value)
        for n, value in enumerate(values)
    )


def series(*values: int, metric: str = "requests") -> Series:
    return Series(
        metric=metric,
        title="Requests per hour",
        period="last 24 hours",
        noun="requests",
        empty="No requests",
        axis="hour (UTC)",
        points=points(*values),
        value_text=count_text,
        tick_text=short_count,
        label_every=2,
    )


def parse(svg: str) -> ET.Element:
    # Parsed as XML, with the namespace HTML gives inline SVG.
    return ET.fromstring(str(svg).replace("<svg ", f'<svg xmlns="{SVG[1:-1]}" ', 1))


@pytest.mark.parametrize(
    ("peak", "ticks"),
    [
        (0, (0,)),
        (1, (0, 1)),
        (3, (0, 1, 2, 3)),
        (4, (0, 1, 2, 3, 4)),
        (7, (0, 2, 4, 6, 8)),
        (10, (0, 5, 10)),
        (40, (0, 10, 20, 30, 40)),
        (41, (0, 20, 40, 60)),
        (1234, (0, 500, 1000, 1500)),
        (999_999, (0, 500_000, 1_000_000)),
        (50_000, (0, 20_000, 40_000, 60_000)),
    ],
)
def test_y_axis_ticks_are_round_and_reach_the_peak(peak: int, ticks: tuple[int, ...]) -> None:
    assert nice_ticks(peak) == ticks
    assert ticks[-1] >= peak and len(ticks) <= 5


def test_bar_heights_are_proportional_to_the_values_and_the_top_tick() -> None:
    shape = layout(points(0, 2, 4, 8, 3))  # ticks 0, 2, 4, 6, 8: 8 fills the plot
    heights = [bar.height for bar in shape.bars]
    assert heights[0] == 0
    assert heights[3] == pytest.approx(SIZE.plot_height)
    assert heights[1] == pytest.approx(SIZE.plot_height / 4)
    assert heights[4] == pytest.approx(SIZE.plot_height * 3 / 8)
    for bar in shape.bars:  # every bar stands on the baseline
        assert bar.y + bar.height == pytest.approx(SIZE.baseline)
    assert [t.value for t in shape.ticks] == [0, 2, 4, 6, 8]
    assert shape.ticks[0].y == pytest.approx(SIZE.baseline)
    assert shape.ticks[-1].y == pytest.approx(SIZE.top)


def test_a_tiny_value_still_shows_and_zero_draws_nothing() -> None:
    shape = layout(points(10_000, 1, 0))
    assert shape.bars[1].height == SIZE.min_bar
    assert shape.bars[2].height == 0


def test_bars_share_the_width_in_order_without_overlapping() -> None:
    shape = layout(points(*range(24)))
    assert len(shape.bars) == len(shape.slots) == 24
    for slot, bar in zip(shape.slots, shape.bars, strict=True):
        assert slot.width == pytest.approx(100 / 24)
        assert slot.x < bar.x and bar.x + bar.width < slot.x + slot.width
        assert bar.width == pytest.approx(slot.width * SIZE.bar_fill)
    lefts = [bar.x for bar in shape.bars]
    assert lefts == sorted(lefts)
    assert shape.slots[0].x == 0 and shape.slots[-1].x + shape.slots[-1].width == pytest.approx(100)


def test_labels_count_back_from_the_latest_bucket_and_stay_inside() -> None:
    hourly = layout(points(*[1] * 24), label_every=6)
    assert [label.text for label in hourly.labels] == ["05:00", "11:00", "17:00", "23:00"]
    assert [label.anchor for label in hourly.labels] == ["middle", "middle", "middle", "end"]
    # On a phone only every other label shows, the latest among them.
    assert [label.minor for label in hourly.labels] == [True, False, True, False]
    assert hourly.labels[-1].x == 100  # the latest, against the right edge
    daily = layout(points(*[1] * 30), label_every=7)
    assert daily.labels[0].anchor == "start" and daily.labels[0].x == 0
    assert all(0 <= label.x <= 100 for label in daily.labels)


def test_the_chart_is_svg_with_a_title_a_summary_and_a_tooltip_per_bar() -> None:
    svg = render(series(0, 3, 12), "chart-24h-requests")
    root = parse(svg)
    assert root.get("role") == "img"
    labelled_by = root.get("aria-labelledby", "").split()
    assert labelled_by == ["chart-24h-requests-title", "chart-24h-requests-desc"]
    ids = {element.get("id"): element for element in root.iter() if element.get("id")}
    assert ids[labelled_by[0]].text == "Requests per hour, last 24 hours"
    assert ids[labelled_by[1]].text == (
        "15 requests in the last 24 hours; the most, 12, in May 1, 02:00 UTC."
    )
    bars = root.findall(f"{SVG}g[@class='bars']/{SVG}g")
    assert [(b.get("data-bucket"), b.get("data-value")) for b in bars] == [
        ("2030-05-01T00:00Z", "0"),
        ("2030-05-01T01:00Z", "3"),
        ("2030-05-01T02:00Z", "12"),
    ]
    assert [b.findtext(f"{SVG}title") for b in bars] == [
        "May 1, 00:00 UTC: 0 requests",
        "May 1, 01:00 UTC: 3 requests",
        "May 1, 02:00 UTC: 12 requests",
    ]
    # A bar for every value above zero; every bucket has a column to point at.
    assert [len(b.findall(f"{SVG}rect[@class='fill']")) for b in bars] == [0, 1, 1]
    assert all(len(b.findall(f"{SVG}rect[@class='slot']")) == 1 for b in bars)
    texts = {t.get("class"): t.text for t in root.iter(f"{SVG}text")}
    assert texts["chart-title"] == "Requests per hour"
    assert texts["axis-caption"] == "hour (UTC)"
    ticks = [t.text for t in root.iter(f"{SVG}text") if t.get("class") == "tick"]
    assert ticks == ["0", "5", "10", "15"]
    assert "empty-note" not in texts


def test_an_empty_chart_says_so() -> None:
    root = parse(render(series(0, 0, 0), "c"))
    notes = [t.text for t in root.iter(f"{SVG}text") if t.get("class") == "empty-note"]
    assert notes == ["No requests"]
    assert root.find(f".//{SVG}rect[@class='fill']") is None
    assert root.findtext(f"{SVG}desc") == "No requests in the last 24 hours."


def test_the_markup_works_under_the_pages_csp_and_escapes_text() -> None:
    hostile = Series(
        metric="requests",
        title='<script>alert("t")</script>',
        period="<b>p</b>",
        noun="<i>n</i>",
        empty="none",
        axis="a & b",
        points=(Point('k"', "<l>", "<s>", 1),),
        value_text=count_text,
        tick_text=short_count,
    )
    svg = str(render(hostile, 'id"x'))
    assert "<script" not in svg and "<b>" not in svg and "<i>" not in svg and "<l>" not in svg
    parse(svg)  # still well-formed
    # No inline style or script for the Content-Security-Policy to refuse.
    assert not re.search(r"<style|style=|<script|\son[a-z]+=", svg)


def test_axis_figures_are_short() -> None:
    assert [short_count(n) for n in (0, 750, 2_500, 25_000, 1_500_000)] == [
        "0",
        "750",
        "2,500",
        "25k",
        "1.5M",
    ]
    assert [short_dollars(n) for n in (0, 50_000, 250_000_000, 1_500 * 10**9, 10**7)] == [
        "$0",
        "$0.00005",
        "$0.25",
        "$1,500",
        "$0.01",
    ]


def test_usage_is_bucketed_into_the_last_24_hours_and_30_days() -> None:
    now = datetime(2030, 5, 31, 14, 25, tzinfo=UTC)

    def used(at: datetime, requests: int) -> tuple[datetime, UsageTotals]:
        return at, UsageTotals(requests=requests, total_tokens=10 * requests, cost_nanousd=7)

    rows = [
        used(datetime(2030, 5, 1, 23, tzinfo=UTC), 100),  # the 31st day back: in neither
        used(datetime(2030, 5, 2, 0, tzinfo=UTC), 1),  # the 30th day back: by day only
        used(datetime(2030, 5, 30, 14, tzinfo=UTC), 2),  # 24 hours ago: just out of the hourly
        used(datetime(2030, 5, 30, 15, tzinfo=UTC), 3),
        used(datetime(2030, 5, 31, 14, tzinfo=UTC), 4),
    ]
    hours, days = bucket_usage(rows, now)
    assert len(hours) == 24 and len(days) == 30
    assert hours[0].key == "2030-05-30T15:00Z" and hours[-1].key == "2030-05-31T14:00Z"
    assert [h.totals.requests for h in hours if h.totals.requests] == [3, 4]
    assert hours[-1].span == "May 31, 14:00\u201315:00 UTC" and hours[-1].label == "14:00"
    assert days[0].key == "2030-05-02T00:00Z" and days[-1].key == "2030-05-31T00:00Z"
    assert [(d.label, d.totals.requests) for d in days if d.totals.requests] == [
        ("May 2", 1),
        ("May 30", 5),
        ("May 31", 4),
    ]
    assert days[-2].totals.total_tokens == 50 and days[-2].totals.cost_nanousd == 14
    assert days[-1].span == "Fri May 31, 2030 (UTC)"
    # Every row inside a window is counted in it once.
    assert sum(d.totals.requests for d in days) == 10
