"""The audit log's ``since`` and ``until`` at the ends of the calendar: a moment whose offset
carries it past year 1 or 9999 is a 400 naming the field, on every backend, never a 500."""

from __future__ import annotations

import pytest

from tests.conftest import Proxy


@pytest.fixture
def proxy_database_url(database_url: str) -> str:
    return database_url


@pytest.mark.parametrize("field", ["since", "until"])
@pytest.mark.parametrize(
    "moment",
    ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00%2B14:00", "0001-01-01T00:30:00%2B01:00"],
)
async def test_a_moment_past_the_calendar_is_refused_by_name(
    proxy: Proxy, field: str, moment: str
) -> None:
    await proxy.create_project()
    status, answer = await proxy.manage("GET", f"/audit?{field}={moment}")
    assert status == 400, answer
    assert answer["error"]["code"] == "invalid_field"
    assert answer["error"]["message"].startswith(f"{field}: ")


async def test_the_ends_of_the_calendar_themselves_are_answered(proxy: Proxy) -> None:
    await proxy.create_project()
    status, page = await proxy.manage(
        "GET", "/audit?since=0001-01-01T00:00:00Z&until=9999-12-31T23:59:59Z"
    )
    assert status == 200, page
    assert [event["action"] for event in page["events"]] == ["project.create"]
    status, page = await proxy.manage("GET", "/audit?since=9999-12-31T23:59:59%2B05:00")
    assert (status, page["events"]) == (200, []), page


@pytest.mark.parametrize("year", ["0001", "0099", "0999", "0100"])
async def test_an_early_year_is_compared_as_a_moment(proxy: Proxy, year: str) -> None:
    """Every event is after January of a year long gone, and none before it: on SQLite the year
    was written unpadded ('999-01-01…'), so as text it sorted after '2026-…'."""
    await proxy.create_project()
    status, since = await proxy.manage("GET", f"/audit?since={year}-01-01T00:00:00Z")
    assert (status, [e["action"] for e in since["events"]]) == (200, ["project.create"]), since
    status, until = await proxy.manage("GET", f"/audit?until={year}-01-01T00:00:00Z")
    assert (status, until["events"]) == (200, []), until


@pytest.mark.parametrize("moment", ["2000-01-01T00:00:00z", "2000-01-01t00:00:00.5z"])
async def test_a_lower_case_z_is_utc_as_rfc_3339_allows(proxy: Proxy, moment: str) -> None:
    """RFC 3339 (and the document's date-time) allow "t" and "z" in lower case."""
    await proxy.create_project()
    status, since = await proxy.manage("GET", f"/audit?since={moment}")
    assert (status, [e["action"] for e in since["events"]]) == (200, ["project.create"]), since
    status, until = await proxy.manage("GET", f"/audit?until={moment}")
    assert (status, until["events"]) == (200, []), until


@pytest.mark.parametrize("moment", ["2000-01-01T05:00:00+05:00", "2000-01-01T05:00:00.5+05:00"])
async def test_an_offset_with_its_plus_sign_unencoded_is_that_offset(
    proxy: Proxy, moment: str
) -> None:
    """The "+" of an offset written into the URL as is (``?since=…T05:00:00+05:00``, as an
    f-string or a shell makes it) reaches the server as a space, which can only be that sign: it
    was refused as no RFC 3339 timestamp."""
    await proxy.create_project()
    status, since = await proxy.manage("GET", f"/audit?since={moment}")
    assert (status, [e["action"] for e in since["events"]]) == (200, ["project.create"]), since
    status, until = await proxy.manage("GET", f"/audit?until={moment}")
    assert (status, until["events"]) == (200, []), until
