"""Budget holds in the store, run against each backend: a SQLite file and a real PostgreSQL.

A request on a budgeted token holds the most it can cost, then settles: the cost becomes spend
and the rest of the hold returns to the budget. Holds must never add up to more than the budget,
however many requests (processes, instances) take them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from llm_proxy.models import AuditEntry, BudgetHold, Project, Token, utcnow
from llm_proxy.store import Store
from llm_proxy.store.opening import open_store

AUDIT = AuditEntry(actor="test", action="change", target_type="thing")
HOUR = 3600.0


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    opened = await open_store(database_url)
    now = utcnow()
    await opened.create_project(
        Project("p1", "p1", "", {}, True, now, now, "sk-…", "ciphertext"), AUDIT
    )
    yield opened
    await opened.close()


async def budgeted(store: Store, budget: int | None, token_id: str = "t1") -> None:
    now = utcnow()
    token = Token(
        id=token_id,
        project_id="p1",
        expires_at=now + timedelta(hours=1),
        is_active=True,
        request_count=0,
        max_requests=None,
        created_at=now,
        last_used_at=None,
        budget_nanousd=budget,
    )
    await store.create_token(token, f"hash-{token_id}", AUDIT)


async def spent_and_reserved(store: Store, token_id: str = "t1") -> tuple[int, int]:
    token = await store.get_token(token_id)
    assert token is not None
    return token.spent_nanousd, token.reserved_nanousd


async def test_a_hold_within_the_budget_is_reserved_whole(store: Store) -> None:
    await budgeted(store, 1000)
    assert await store.reserve_budget("t1", "h1", 300, 100, HOUR) == BudgetHold(True, 300, 700)
    assert await spent_and_reserved(store) == (0, 300)


async def test_a_hold_wanting_more_than_the_room_gets_the_room(store: Store) -> None:
    await budgeted(store, 1000)
    await store.reserve_budget("t1", "h1", 300, 100, HOUR)
    assert await store.reserve_budget("t1", "h2", 900, 100, HOUR) == BudgetHold(True, 700, 0)
    assert await spent_and_reserved(store) == (0, 1000)


async def test_room_exactly_the_minimum_is_admitted(store: Store) -> None:
    await budgeted(store, 1000)
    await store.reserve_budget("t1", "h1", 900, 900, HOUR)
    assert await store.reserve_budget("t1", "h2", 500, 100, HOUR) == BudgetHold(True, 100, 0)


async def test_room_taken_by_holds_refuses_for_now_but_not_for_good(store: Store) -> None:
    await budgeted(store, 1000)
    await store.reserve_budget("t1", "h1", 950, 100, HOUR)
    refused = await store.reserve_budget("t1", "h2", 100, 100, HOUR)
    # The holds may yet be released: the budget is not exhausted.
    assert refused == BudgetHold(False, 0, 50, exhausted=False)
    assert await spent_and_reserved(store) == (0, 950)  # the refusal reserved nothing

    await store.settle_budget("t1", "h1", 0)
    assert (await store.reserve_budget("t1", "h3", 100, 100, HOUR)).admitted


async def test_spend_leaving_less_than_the_minimum_exhausts_the_budget(store: Store) -> None:
    await budgeted(store, 1000)
    await store.settle_budget("t1", "", 950)
    refused = await store.reserve_budget("t1", "h1", 100, 100, HOUR)
    assert refused == BudgetHold(False, 0, 50, exhausted=True)
    # A cheaper request still fits.
    assert await store.reserve_budget("t1", "h2", 100, 10, HOUR) == BudgetHold(True, 50, 0)


async def test_spend_beyond_the_budget_leaves_no_room_rather_than_negative_room(
    store: Store,
) -> None:
    await budgeted(store, 1000)
    await store.reserve_budget("t1", "h1", 100, 100, HOUR)
    await store.settle_budget("t1", "h1", 1500)  # a request that cost more than it held
    assert await spent_and_reserved(store) == (1500, 0)
    assert await store.reserve_budget("t1", "h2", 1, 1, HOUR) == BudgetHold(False, 0, 0, True)


async def test_settling_moves_the_cost_to_spend_and_releases_the_rest(store: Store) -> None:
    await budgeted(store, 1000)
    await store.reserve_budget("t1", "h1", 300, 100, HOUR)
    await store.reserve_budget("t1", "h2", 200, 100, HOUR)
    await store.settle_budget("t1", "h1", 120)
    assert await spent_and_reserved(store) == (120, 200)
    assert await store.reserve_budget("t1", "h3", 1000, 1, HOUR) == BudgetHold(True, 680, 0)


async def test_settling_with_no_cost_releases_the_hold(store: Store) -> None:
    await budgeted(store, 1000)
    await store.reserve_budget("t1", "h1", 300, 100, HOUR)
    await store.settle_budget("t1", "h1", 0)
    assert await spent_and_reserved(store) == (0, 0)
    await store.settle_budget("t1", "h1", 0)  # settling twice releases nothing more
    assert await spent_and_reserved(store) == (0, 0)


async def test_settling_without_a_hold_only_adds_the_spend(store: Store) -> None:
    await budgeted(store, 1000)
    await store.reserve_budget("t1", "h1", 300, 100, HOUR)
    await store.settle_budget("t1", "", 40)
    await store.settle_budget("t1", "no-such-hold", 2)
    assert await spent_and_reserved(store) == (42, 300)


async def test_expired_holds_are_reclaimed_and_their_room_returns(store: Store) -> None:
    await budgeted(store, 1000)
    await budgeted(store, 1000, "t2")
    await store.reserve_budget("t1", "short-1", 300, 100, 0.01)
    await store.reserve_budget("t1", "long", 200, 100, HOUR)
    await store.reserve_budget("t2", "short-2", 400, 100, 0.01)
    await asyncio.sleep(0.1)
    assert await store.reclaim_budget_holds() == 2
    assert await spent_and_reserved(store, "t1") == (0, 200)
    assert await spent_and_reserved(store, "t2") == (0, 0)
    assert await store.reclaim_budget_holds() == 0
    assert await store.reserve_budget("t2", "h", 1000, 1000, HOUR) == BudgetHold(True, 1000, 0)

    # A request settling after its hold was reclaimed still counts its spend, and only that.
    await store.settle_budget("t1", "short-1", 250)
    assert await spent_and_reserved(store, "t1") == (250, 200)


async def test_a_renewed_hold_outlives_its_lease_and_a_reclaimed_one_stays_gone(
    store: Store,
) -> None:
    await budgeted(store, 1000)
    await store.reserve_budget("t1", "renewed", 300, 100, 1.0)
    await store.reserve_budget("t1", "lapsing", 200, 100, 1.0)
    await store.reserve_budget("t1", "reclaimed", 100, 100, 0.01)
    await asyncio.sleep(0.05)
    assert await store.reclaim_budget_holds() == 1
    # One statement for all; a hold reclaimed (or settled, or never there) is not taken again.
    await store.renew_budget_holds(["renewed", "reclaimed", "unknown"], HOUR)
    await asyncio.sleep(1.1)  # the first lease of each is over; only the renewal keeps one
    assert await store.reclaim_budget_holds() == 1
    assert await spent_and_reserved(store) == (0, 300)
    await store.renew_budget_holds([], HOUR)


async def test_a_settlement_racing_the_reclaim_releases_the_hold_once(store: Store) -> None:
    await budgeted(store, 100_000)
    await store.reserve_budget("t1", "long", 500, 1, HOUR)
    for n in range(20):
        await store.reserve_budget("t1", f"h{n}", 100, 1, 0.01)
    await asyncio.sleep(0.1)
    await asyncio.gather(
        store.reclaim_budget_holds(),
        *(store.settle_budget("t1", f"h{n}", 1) for n in range(20)),
        store.reclaim_budget_holds(),
    )
    assert await spent_and_reserved(store) == (20, 500)


async def test_a_changed_budget_applies_to_the_next_hold(store: Store) -> None:
    await budgeted(store, 1000)
    await store.reserve_budget("t1", "h1", 1000, 1, HOUR)
    assert not (await store.reserve_budget("t1", "h2", 100, 100, HOUR)).admitted
    await store.update_token("t1", {"budget_nanousd": 1100}, AUDIT)
    assert await store.reserve_budget("t1", "h2", 100, 100, HOUR) == BudgetHold(True, 100, 0)


async def test_a_token_without_a_budget_is_admitted_without_a_hold(store: Store) -> None:
    await budgeted(store, None)
    assert await store.reserve_budget("t1", "h1", 300, 100, HOUR) == BudgetHold(True, 0, 0)
    assert await spent_and_reserved(store) == (0, 0)
    await store.settle_budget("t1", "h1", 70)
    assert await spent_and_reserved(store) == (70, 0)
    # A token deleted meanwhile: nothing to hold, nothing to settle.
    assert await store.reserve_budget("gone", "h2", 300, 100, HOUR) == BudgetHold(True, 0, 0)
    await store.settle_budget("gone", "h2", 70)


async def test_deleting_a_token_deletes_its_holds(store: Store) -> None:
    await budgeted(store, 1000)
    await store.reserve_budget("t1", "h1", 300, 100, 0.01)
    await store.delete_project("p1", AUDIT)
    await asyncio.sleep(0.1)
    assert await store.reclaim_budget_holds() == 0


async def test_concurrent_holds_on_every_instance_never_exceed_the_budget(
    database_url: str, store: Store
) -> None:
    """Two stores on one database, as two processes or instances: their holds share the room."""
    want = 1_000_000
    await budgeted(store, 10 * want)
    other = await open_store(database_url)
    try:
        holds = await asyncio.gather(
            *(
                (store if n % 2 else other).reserve_budget("t1", f"h{n}", want, want, HOUR)
                for n in range(64)
            )
        )
        admitted = [n for n, hold in enumerate(holds) if hold.admitted]
        assert len(admitted) == 10
        assert sum(hold.held_nanousd for hold in holds) == 10 * want
        assert sorted(holds[n].remaining_nanousd for n in admitted) == [k * want for k in range(10)]
        refused = [hold for hold in holds if not hold.admitted]
        assert all(hold == BudgetHold(False, 0, 0, exhausted=False) for hold in refused)
        assert await spent_and_reserved(store) == (0, 10 * want)

        await asyncio.gather(
            *((store if n % 2 else other).settle_budget("t1", f"h{n}", want // 4) for n in admitted)
        )
        assert await spent_and_reserved(store) == (10 * want // 4, 0)
    finally:
        await other.close()


@pytest.mark.parametrize("steps", range(12))
async def test_a_hold_cancelled_at_any_point_leaves_the_store_writable(
    store: Store, steps: int
) -> None:
    """A client that hangs up cancels its admission wherever it is, mid-transaction included."""
    await budgeted(store, 1_000)
    attempt = asyncio.ensure_future(store.reserve_budget("t1", "h1", 100, 10, HOUR))
    for _ in range(steps):
        await asyncio.sleep(0)
    attempt.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await attempt
    # The next writes go through, and the cancelled hold either never happened or is whole.
    assert (await store.reserve_budget("t1", "h2", 100, 10, HOUR)).admitted
    assert await spent_and_reserved(store) in {(0, 100), (0, 200)}
    await store.settle_budget("t1", "h2", 0)
    await store.settle_budget("t1", "h1", 0)
    assert await spent_and_reserved(store) == (0, 0)


async def test_a_batch_of_settlements_is_one_step_for_every_token_in_it(store: Store) -> None:
    await budgeted(store, 1_000, "t1")
    await budgeted(store, 1_000, "t2")
    for hold_id in ("a", "b", "c"):
        await store.reserve_budget("t1", hold_id, 100, 10, HOUR)
    await store.reserve_budget("t2", "d", 300, 10, HOUR)
    await store.settle_budgets(
        [
            ("t1", "a", 40),  # settled: 40 spent, 60 released
            ("t1", "b", 0),  # released
            ("t2", "d", 300),  # spent whole
            ("t1", "gone", 7),  # a hold reclaimed meanwhile: only its cost
            ("t2", "", 5),  # spend without a hold
        ]
    )
    assert await spent_and_reserved(store, "t1") == (47, 100)  # "c" still held
    assert await spent_and_reserved(store, "t2") == (305, 0)
    await store.settle_budgets([])
    assert await spent_and_reserved(store, "t1") == (47, 100)


async def test_a_request_refused_for_good_leaves_the_token_exhausted_until_its_budget_changes(
    store: Store,
) -> None:
    """Admission refuses for good when the budget left, holds aside, is less than the least the
    request can cost; the token's status says exhausted by the same rule, though the budget is not
    spent to the last nano-dollar."""
    await budgeted(store, 1000)
    refused = await store.reserve_budget("t1", "h1", 5000, 4200, HOUR)
    assert (refused.admitted, refused.exhausted) == (False, True)
    await store.note_budget_refused("t1", 1000, 4200)
    await store.note_budget_refused("t1", 1000, 9000)  # a dearer one: the least is kept
    token = await store.get_token("t1")
    assert token is not None
    assert (token.budget_refused_nanousd, token.status(utcnow())) == (4200, "exhausted")
    # A refusal judged on a budget since changed is not the token's.
    await store.update_token(
        "t1", {"budget_nanousd": 10_000, "budget_refused_nanousd": None}, AUDIT
    )
    await store.note_budget_refused("t1", 1000, 4200)
    token = await store.get_token("t1")
    assert token is not None
    assert (token.budget_refused_nanousd, token.status(utcnow())) == (None, "active")
