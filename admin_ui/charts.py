"""Bar charts as inline SVG, drawn on the server: no script, no inline style (the pages' CSP).

Colours and fonts come from classes styled by admin.css. Each bar carries an SVG ``<title>``, the
tooltip a browser shows on hover, and the chart a ``<title>``/``<desc>`` pair that names it and
sums it up for screen readers. The geometry (:func:`layout`) is kept apart from the markup
(:func:`render`) so it can be tested as numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

from llm_proxy.models import NANOS_PER_USD


@dataclass(frozen=True, slots=True)
class Point:
    """One bar: a time bucket and what it counted."""

    key: str  # the bucket's start, machine-readable (``data-bucket``)
    label: str  # short, under the axis: ``14:00``, ``May 3``
    span: str  # what the bucket covers, in the tooltip: ``May 3, 14:00-15:00 UTC``
    value: int


@dataclass(frozen=True, slots=True)
class Series:
    """What one chart shows and how its numbers read."""

    metric: str  # ``requests``, ``tokens``, ``errors``, ``spend``
    title: str  # ``Requests per hour``
    period: str  # ``last 24 hours``
    noun: str  # ``requests``, ``spent``: follows a value in tooltips and the summary
    empty: str  # across a chart with nothing to show, short enough for a phone: ``No requests``
    axis: str  # the x axis caption, ``hour (UTC)``
    points: tuple[Point, ...]
    value_text: Callable[[int], str]  # a value in full, for tooltips
    tick_text: Callable[[int], str]  # a value on the y axis, short
    label_every: int = 1  # label every n-th bucket, counted back from the latest


@dataclass(frozen=True, slots=True)
class Size:
    """Heights in CSS pixels; across, everything is a percentage of the chart's width.

    So a chart fills whatever column it is given, from a phone's to a wide screen's, while its
    text keeps the page's size instead of shrinking and growing with the drawing (``viewBox``
    scaling would).
    """

    height: float = 180.0
    top: float = 34.0  # the title, and the top tick's figure above its line
    bottom: float = 34.0  # bucket labels and the axis caption
    bar_fill: float = 0.7  # the share of its slot a bar fills; the rest is gap
    min_bar: float = 1.5  # a value above zero never draws lower than this
    edge: float = 8.0  # a label centred closer than this (per cent) to a side is aligned to it

    @property
    def plot_height(self) -> float:
        return self.height - self.top - self.bottom

    @property
    def baseline(self) -> float:
        return self.top + self.plot_height


@dataclass(frozen=True, slots=True)
class Box:
    """A rectangle: ``x`` and ``width`` in per cent of the chart's width, the rest in pixels."""

    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True, slots=True)
class Tick:
    value: int
    y: float


@dataclass(frozen=True, slots=True)
class Label:
    text: str
    x: float  # per cent
    anchor: str  # text-anchor: start, middle, end
    minor: bool  # every other label, counted back from the latest: left out on narrow screens


@dataclass(frozen=True, slots=True)
class Layout:
    size: Size
    slots: tuple[Box, ...]  # each bucket's whole column: the hover target of its tooltip
    bars: tuple[Box, ...]
    ticks: tuple[Tick, ...]
    labels: tuple[Label, ...]


_NICE_STEPS = (1, 2, 5, 10)


def nice_ticks(peak: int, most: int = 4) -> tuple[int, ...]:
    """Whole, round y-axis values from 0 to at least ``peak``, at most ``most`` steps apart:
    ``nice_ticks(7) == (0, 2, 4, 6, 8)``. Nothing to show is just ``(0,)``."""
    if peak <= 0:
        return (0,)
    raw = peak / most
    magnitude = 1
    while magnitude * 10 <= raw:
        magnitude *= 10
    step = next(m * magnitude for m in _NICE_STEPS if m * magnitude >= raw)
    top = -(-peak // step) * step
    return tuple(range(0, top + 1, step))


def layout(points: Sequence[Point], label_every: int = 1, size: Size = Size()) -> Layout:
    """Where every bar, tick and label goes."""
    ticks = nice_ticks(max((p.value for p in points), default=0))
    ceiling = ticks[-1] or 1
    slot = 100.0 / max(1, len(points))
    width = slot * size.bar_fill
    slots: list[Box] = []
    bars: list[Box] = []
    labels: list[Label] = []
    for index, point in enumerate(points):
        left = index * slot
        slots.append(Box(left, size.top, slot, size.plot_height))
        height = size.plot_height * point.value / ceiling
        if point.value > 0:
            height = max(height, size.min_bar)
        bars.append(Box(left + (slot - width) / 2, size.baseline - height, width, height))
        back, every = len(points) - 1 - index, max(1, label_every)
        if back % every == 0:
            minor = (back // every) % 2 == 1
            centre = left + slot / 2
            if centre < size.edge:
                labels.append(Label(point.label, 0.0, "start", minor))
            elif centre > 100.0 - size.edge:
                labels.append(Label(point.label, 100.0, "end", minor))
            else:
                labels.append(Label(point.label, centre, "middle", minor))
    tick_marks = tuple(
        Tick(value, size.baseline - size.plot_height * value / ceiling) for value in ticks
    )
    return Layout(size, tuple(slots), tuple(bars), tick_marks, tuple(labels))


def _n(number: float) -> str:
    """A coordinate, short: ``12``, ``12.5``, ``12.33``."""
    return f"{number:.2f}".rstrip("0").rstrip(".")


def _pc(number: float) -> str:
    return f"{_n(number)}%"


def summary(series: Series) -> str:
    """The chart in one sentence, for screen readers."""
    total = sum(p.value for p in series.points)
    if total == 0:
        return f"{series.empty} in the {series.period}."
    peak = max(series.points, key=lambda p: p.value)
    return (
        f"{series.value_text(total)} {series.noun} in the {series.period}; "
        f"the most, {series.value_text(peak.value)}, in {peak.span}."
    )


def render(series: Series, chart_id: str, size: Size = Size()) -> Markup:
    """The chart as an ``<svg>`` element to put in a page."""
    shape = layout(series.points, series.label_every, size)
    ident = escape(chart_id)
    out: list[str] = [
        f'<svg class="chart" id="{ident}" width="100%" height="{_n(size.height)}" role="img"'
        f' aria-labelledby="{ident}-title {ident}-desc" data-metric="{escape(series.metric)}">',
        f'<title id="{ident}-title">{escape(series.title)}, {escape(series.period)}</title>',
        f'<desc id="{ident}-desc">{escape(summary(series))}</desc>',
        f'<text class="chart-title" x="0" y="14">{escape(series.title)}</text>',
        '<g class="grid">',
    ]
    out.extend(
        f'<line x1="0" x2="100%" y1="{_n(tick.y)}" y2="{_n(tick.y)}"/>' for tick in shape.ticks
    )
    out.append('</g><g class="bars">')
    for point, slot, bar in zip(series.points, shape.slots, shape.bars, strict=True):
        out.append(
            f'<g class="bar" data-bucket="{escape(point.key)}" data-value="{point.value}">'
            f"<title>{escape(point.span)}: {escape(series.value_text(point.value))} "
            f"{escape(series.noun)}</title>"
            f'<rect class="slot" x="{_pc(slot.x)}" y="{_n(slot.y)}" width="{_pc(slot.width)}"'
            f' height="{_n(slot.height)}"/>'
        )
        if point.value > 0:
            out.append(
                f'<rect class="fill" x="{_pc(bar.x)}" y="{_n(bar.y)}" width="{_pc(bar.width)}"'
                f' height="{_n(bar.height)}"/>'
            )
        out.append("</g>")
    out.append("</g>")
    # Tick figures sit above their lines at the left, drawn after the bars with a halo (CSS) so
    # a tall bar never hides them.
    out.extend(
        f'<text class="tick" x="0" y="{_n(tick.y - 3)}">{escape(series.tick_text(tick.value))}'
        "</text>"
        for tick in shape.ticks
    )
    out.append(
        f'<line class="axis" x1="0" x2="100%" y1="{_n(size.baseline)}" y2="{_n(size.baseline)}"/>'
    )
    label_y = size.baseline + 14
    out.extend(
        f'<text class="label{" minor" if label.minor else ""}" x="{_pc(label.x)}"'
        f' y="{_n(label_y)}" text-anchor="{label.anchor}">{escape(label.text)}</text>'
        for label in shape.labels
    )
    out.append(
        f'<text class="axis-caption" x="50%" y="{_n(size.height - 3)}"'
        f' text-anchor="middle">{escape(series.axis)}</text>'
    )
    if all(p.value == 0 for p in series.points):
        out.append(
            f'<text class="empty-note" x="50%" y="{_n(size.top + size.plot_height / 2)}"'
            f' text-anchor="middle">{escape(series.empty)}</text>'
        )
    out.append("</svg>")
    return Markup("".join(out))


def count_text(value: int) -> str:
    """A count in full: ``12,345``."""
    return f"{value:,}"


def short_count(value: int) -> str:
    """A round count on an axis: ``750``, ``2,500``, ``25k``, ``1.5M``."""
    if value < 10_000:
        return f"{value:,}"
    if value < 1_000_000:
        return f"{value / 1000:g}k"
    return f"{value / 1_000_000:g}M"


def short_dollars(nanos: int) -> str:
    """A round amount on an axis: ``$0``, ``$0.00005``, ``$0.25``, ``$1,500``."""
    if nanos == 0:
        return "$0"
    if nanos % NANOS_PER_USD == 0:
        return f"${nanos // NANOS_PER_USD:,}"
    whole, rest = divmod(nanos, NANOS_PER_USD)
    fraction = f"{rest:09d}".rstrip("0").ljust(2, "0")
    return f"${whole:,}.{fraction}"
