"""One-time ids of the admin pages' issue forms in the store, run against each backend: a SQLite
file and a real PostgreSQL. Each store opened here stands for a process or an instance: however
many post the same form, or ask for the page after it, at once, one issues and one shows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from llm_proxy.models import IssueForm
from llm_proxy.store import Store
from llm_proxy.store.opening import open_store
from llm_proxy.store.records import FORGET_ISSUE_FORMS_AT_ONCE

HOUR = 3600.0


@pytest.fixture
async def stores(database_url: str) -> AsyncIterator[list[Store]]:
    opened = [await open_store(database_url) for _ in range(3)]
    yield opened
    for store in opened:
        await store.close()


async def test_a_form_id_is_claimed_by_one_post_of_all_that_race(stores: list[Store]) -> None:
    claims = await asyncio.gather(
        *(stores[n % 3].claim_issue_form("f" * 22, HOUR) for n in range(12))
    )
    assert sorted(claims) == [False] * 11 + [True]
    assert await stores[1].issue_form("f" * 22) == IssueForm(None, shown=False)  # issuing
    assert not await stores[2].claim_issue_form("f" * 22, HOUR)


async def test_a_released_form_may_be_claimed_again_and_an_issued_one_may_not(
    stores: list[Store],
) -> None:
    first, second, _ = stores
    assert await first.claim_issue_form("a" * 22, HOUR)
    await first.release_issue_form("a" * 22)  # nothing issued: a field was wrong
    assert await second.issue_form("a" * 22) is None
    assert await second.claim_issue_form("a" * 22, HOUR)
    await second.record_issue_form("a" * 22, "t1")
    await first.release_issue_form("a" * 22)  # a release never forgets what was issued
    assert await first.issue_form("a" * 22) == IssueForm("t1", shown=False)
    assert not await first.claim_issue_form("a" * 22, HOUR)
    assert await first.issue_form("never-claimed") is None


async def test_a_value_is_marked_shown_by_one_page_of_all_that_race(stores: list[Store]) -> None:
    assert await stores[0].claim_issue_form("s" * 22, HOUR)
    await stores[0].record_issue_form("s" * 22, "t1")
    marks = await asyncio.gather(
        *(stores[n % 3].show_issue_form("s" * 22, "t1") for n in range(12))
    )
    assert sorted(marks) == [False] * 11 + [True]
    assert await stores[2].issue_form("s" * 22) == IssueForm("t1", shown=True)
    assert not await stores[1].show_issue_form("s" * 22, "t1")
    # A form the store forgot (or never saw) is remembered as shown from then on.
    assert await stores[1].show_issue_form("u" * 22, "t2")
    assert not await stores[0].show_issue_form("u" * 22, "t2")
    assert await stores[0].issue_form("u" * 22) == IssueForm("t2", shown=True)


async def test_old_form_ids_are_forgotten_a_bounded_number_at_a_time(stores: list[Store]) -> None:
    store = stores[0]
    old = [f"old-{n:04}" for n in range(FORGET_ISSUE_FORMS_AT_ONCE + 20)]
    for form_id in old:
        assert await store.claim_issue_form(form_id, HOUR)
    await store.record_issue_form(old[0], "t1")
    await store.show_issue_form(old[1], "t2")
    await asyncio.sleep(0.02)
    # A claim that remembers nothing older than now forgets the oldest, at most so many.
    assert await store.claim_issue_form("new", 0.0)
    left = [form_id for form_id in old if await store.issue_form(form_id) is not None]
    assert left == old[FORGET_ISSUE_FORMS_AT_ONCE:]
    await asyncio.sleep(0.02)
    assert await store.claim_issue_form("newer", 0.0)
    assert [form_id for form_id in old if await store.issue_form(form_id) is not None] == []
    assert await store.issue_form("new") is None
    # Remembered for as long as asked; a forgotten id is a new form to the store.
    assert await store.claim_issue_form(old[0], HOUR)
    assert await store.issue_form("newer") == IssueForm(None, shown=False)
    assert await store.issue_form(old[0]) == IssueForm(None, shown=False)
