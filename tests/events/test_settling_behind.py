"""A server whose events process falls behind leaves request bodies out of events, and still
charges every budgeted request exactly what it cost."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY

from llm_proxy.events.event import Event, Usage
from llm_proxy.events.settlement import settled_cost
from tests.conftest import Proxy
from tests.events.test_offload import SHED, events_pid, eventually
from tests.proxy import test_budgets
from tests.proxy.test_budgets import INPUT_NANOUSD, OUTPUT_NANOUSD, settled
from tests.waiting import wait_for_lines

pytestmark = pytest.mark.process

# The budget tests' upstream (200-token answers) and prices (budget-mini).
upstream_server = test_budgets.upstream_server
prices_path = test_budgets.prices_path

PROMPT = "hello " * 25_000  # 150 KB: one such body fills the pipe and half the bound below


async def test_behind_the_events_process_a_budget_is_still_charged_exactly(
    proxy_factory: Any, prices_path: Path, tmp_path: Path
) -> None:
    log = tmp_path / "events.jsonl"
    proxy: Proxy = await proxy_factory(
        prices_path=prices_path,
        file_event_log=log,
        event_build_in="process",
        events_backlog_bytes=120_000,  # bodies left out from 60,000 bytes waiting
    )
    budgeted, plain = await proxy.issue_token(budget_usd=5), await proxy.issue_token()
    shed_before = REGISTRY.get_sample_value(SHED) or 0
    pid = events_pid(proxy)
    os.kill(pid, signal.SIGSTOP)  # it reads nothing: what the server sends waits
    usage: dict[str, dict[str, int]] = {}
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(4):
                for issued in (budgeted, plain):
                    async with session.post(
                        f"{proxy.base_url}/v1/chat/completions",
                        json={
                            "model": "budget-mini",
                            "messages": [{"role": "user", "content": PROMPT}],
                        },
                        headers={"Authorization": f"Bearer {issued['token']}"},
                    ) as response:
                        assert response.status == 200
                        request_id = response.headers["LLM-Proxy-Request-ID"]
                        usage[request_id] = (await response.json())["usage"]
                    await asyncio.sleep(0.1)  # the server sends it (linger 0.05 s, this loop)
    finally:
        os.kill(pid, signal.SIGCONT)

    events = await wait_for_lines(log, 8)
    assert [event["request_id"] for event in events] == list(usage)  # none dropped
    first, *behind = events
    assert first["request"]["messages"][0]["content"] == PROMPT  # nothing waited yet
    for event in behind:
        note = re.fullmatch(
            r"\[body not kept: the events process was behind; (\d+) bytes\]", event["request"]
        )
        assert note and int(note[1]) > len(PROMPT)
        assert event["usage"]["source"] == "upstream" and event["model"] == "budget-mini"
    assert REGISTRY.get_sample_value(SHED) == shed_before + 7

    # The budgeted token pays what each of its answers said it used, to the nano-dollar.
    cost = sum(
        used["prompt_tokens"] * INPUT_NANOUSD + used["completion_tokens"] * OUTPUT_NANOUSD
        for event, used in zip(events, usage.values(), strict=True)
        if event["token_id"] == budgeted["id"]
    )
    shown = await settled(proxy, budgeted["id"], spent_at_least=cost / 1e9 * 0.999)
    assert shown["spent_usd"] == pytest.approx(cost / 1e9, rel=1e-9)

    async def plain_usage_counted() -> bool:  # the plain token's, too: no event was lost
        _, token = await proxy.manage("GET", f"/tokens/{plain['id']}")
        return bool(token["usage"]["requests"] == 4)

    await eventually(plain_usage_counted)


def _event(status: int, usage: Usage | None, cost_usd: float | None) -> Event:
    return {"status": status, "usage": usage, "cost_usd": cost_usd}  # type: ignore[typeddict-item]


def _usage(source: str) -> Usage:
    return Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15, source=source)  # type: ignore[typeddict-item]


@pytest.mark.parametrize(
    ("event", "request_kept", "pays"),
    [
        (_event(200, _usage("upstream"), 0.000002), True, 2000),
        (_event(200, _usage("estimated"), 0.000002), True, 2000),
        # Without its request, only the upstream's own count is exact; an estimate (a stream the
        # client left before the usage chunk) would miss the prompt: the hold is charged whole.
        (_event(200, _usage("upstream"), 0.000002), False, 2000),
        (_event(200, _usage("estimated"), 0.000002), False, 9000),
        (_event(200, None, 0.0), False, 9000),
        (_event(200, None, None), True, 9000),  # the model lost its price
        (_event(429, None, 0.0), False, 0),  # refused upstream: nothing to pay
    ],
)
def test_what_a_held_request_pays(event: Event, request_kept: bool, pays: int) -> None:
    assert settled_cost(event, 9000, request_kept=request_kept) == pays
