"""How times and durations read on the pages."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from admin_ui.rendering import (
    ago,
    budget_percent,
    countdown,
    dollars,
    json_text,
    quota_percent,
    rate_limits,
    span,
    when,
)
from admin_ui.tokens import limit_values, plain_dollars
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


def test_money_reads_in_dollars_and_cents_and_small_amounts_in_full() -> None:
    assert dollars(None) == "—"
    assert dollars(0) == "$0.00"
    assert dollars(12_500_000_000) == "$12.50"
    assert dollars(1_234_567_000_000_000) == "$1,234,567.00"
    assert dollars(42_000) == "$0.000042"
    assert dollars(1) == "$0.000000001"
    assert dollars(3_123_456_789) == "$3.123456789"


def test_a_budget_as_typed_back_into_its_box() -> None:
    assert plain_dollars(None) == ""
    assert plain_dollars(12_500_000_000) == "12.5"
    assert plain_dollars(5_000_000_000) == "5"
    assert plain_dollars(42_000) == "0.000042"
    assert plain_dollars(1) == "0.000000001"


def test_limits_read_compactly() -> None:
    plain = Token("t", "p", NOW, True, 0, None, NOW, None)
    limited = replace(
        plain,
        rpm=60,
        tpm=10_000,
        budget_nanousd=4_000_000_000,
        spent_nanousd=1_000_000_000,
        allowed_models=("gpt-4o*", "o3"),
    )
    assert rate_limits(plain) == ""
    assert rate_limits(limited) == "60 rpm · 10,000 tpm"
    assert rate_limits(replace(plain, tpm=500)) == "500 tpm"
    assert budget_percent(plain) == 0
    assert budget_percent(limited) == 25
    assert budget_percent(replace(limited, spent_nanousd=9_000_000_000)) == 100
    assert limit_values(plain) == dict.fromkeys(
        ("max_requests", "rpm", "tpm", "budget_usd", "allowed_models"), ""
    )
    assert limit_values(limited) == {
        "max_requests": "",
        "rpm": "60",
        "tpm": "10000",
        "budget_usd": "4",
        "allowed_models": "gpt-4o*\no3",
    }
    assert json_text({"a": [1]}) == '{\n  "a": [\n    1\n  ]\n}'
