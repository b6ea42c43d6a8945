"""How times and durations read on the pages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from admin_ui.rendering import ago, countdown, quota_percent, span, when
from llm_proxy.models import Token

NOW = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)


def test_durations_read_the_way_people_say_them() -> None:
    assert span(42) == "42 s"
    assert span(23 * 60 + 59) == "23 min"
    assert span(3600) == "1 h"
    assert span(3 * 3600 + 5 * 60) == "3 h 5 min"
    assert span(2 * 86400) == "2 d"
    assert span(2 * 86400 + 4 * 3600 + 59) == "2 d 4 h"
    assert span(-90) == "1 min"


def test_moments_read_relative_to_now() -> None:
    assert ago(None, NOW) == "never"
    assert ago(NOW - timedelta(seconds=2), NOW) == "just now"
    assert ago(NOW - timedelta(minutes=7), NOW) == "7 min ago"
    assert ago(NOW + timedelta(hours=2), NOW) == "in 2 h"
    assert when(None) == "—"
    assert when(NOW) == "2030-05-01 12:00:00 UTC"


def test_expiry_counts_down_then_says_how_long_ago() -> None:
    def token(expires_in: timedelta) -> Token:
        return Token("t", "p", NOW + expires_in, True, 0, None, NOW - timedelta(days=1), None)

    assert countdown(token(timedelta(minutes=23, seconds=30)), NOW) == "expires in 23 min"
    assert countdown(token(timedelta(minutes=-5)), NOW) == "expired 5 min ago"


def test_quota_meter_is_empty_without_a_quota_and_full_when_used_up() -> None:
    unlimited = Token("t", "p", NOW, True, 12, None, NOW, None)
    used_up = Token("t", "p", NOW, True, 12, 10, NOW, None)
    assert quota_percent(unlimited) == 0
    assert quota_percent(used_up) == 100
