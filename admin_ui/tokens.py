"""Token pages: list, detail with usage and spend, edit limits, revoke; the fields of the forms."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any, cast

import orjson
from aiohttp import web

from admin_ui import forms
from admin_ui.activity import timelines
from admin_ui.navigation import see_other
from admin_ui.rendering import render, render_long
from admin_ui.state import actor, operations
from llm_proxy.control import validation
from llm_proxy.control.operations import (
    MAX_COUNT,
    MAX_TOKEN_METADATA_BYTES,
    LimitChanges,
)
from llm_proxy.control.validation import MISSING
from llm_proxy.errors import InvalidField
from llm_proxy.models import NANOS_PER_USD, Token, nanousd, utcnow

STATUSES = ("active", "expired", "revoked", "exhausted")
LIMIT_FIELDS = ("max_requests", "rpm", "tpm", "budget_usd", "allowed_models")
_AMOUNT = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")


# -- form fields ---------------------------------------------------------------------------------
# Text typed into boxes, checked by the API's own validation so the messages are the same.


def _dollars(form: forms.Form, key: str) -> float | None:
    """An amount such as ``12.50``, ``$1,000`` or ``0.25``; blank means None."""
    raw = form.get(key, "").strip().removeprefix("$").strip().replace(",", "").replace("_", "")
    if not raw:
        return None
    if len(raw) > 30 or not _AMOUNT.fullmatch(raw):
        raise InvalidField(key, "must be an amount in US dollars, e.g. 12.50")
    value: float = validation.dollars({key: float(raw)}, key)
    return value


def _patterns(form: forms.Form, key: str) -> list[str] | None:
    """Model globs separated by commas or line breaks; none means None (any model)."""
    typed = [part.strip() for line in form.get(key, "").splitlines() for part in line.split(",")]
    given = [part for part in typed if part]
    if not given:
        return None
    value: list[str] = validation.patterns({key: given}, key)
    return value


def read_metadata(form: forms.Form, key: str) -> dict[str, Any]:
    raw = form.get(key, "").strip()
    if not raw:
        return {}
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidField(key, 'must be a JSON object, e.g. {"team": "search"}') from None
    if (ambiguity := validation.ambiguity(raw)) is not None:
        raise InvalidField(key, ambiguity.problem)  # as the API refuses it
    value = validation.mapping({key: parsed}, key, max_bytes=MAX_TOKEN_METADATA_BYTES)
    return {} if value is MISSING else cast(dict[str, Any], value)


def read_limits(form: forms.Form) -> LimitChanges:
    """The limits posted; a blank box clears its limit, a box not posted leaves it alone."""
    limits: LimitChanges = {}
    for key in ("max_requests", "rpm", "tpm"):
        if key in form:
            count = forms.number(form, key, minimum=1, maximum=MAX_COUNT, required=False)
            limits[key] = count
    if "budget_usd" in form:
        limits["budget_usd"] = _dollars(form, "budget_usd")
    if "allowed_models" in form:
        limits["allowed_models"] = _patterns(form, "allowed_models")
    return limits


def plain_dollars(nanos: int | None) -> str:
    """An amount as typed into a box: ``12.5``, ``0.000001``; no limit is blank."""
    if nanos is None:
        return ""
    return format(Decimal(nanos) / NANOS_PER_USD, "f")


def limit_values(token: Token) -> dict[str, str]:
    """What the limits form shows for a token's current limits."""
    return {
        "max_requests": "" if token.max_requests is None else str(token.max_requests),
        "rpm": "" if token.rpm is None else str(token.rpm),
        "tpm": "" if token.tpm is None else str(token.tpm),
        "budget_usd": plain_dollars(token.budget_nanousd),
        "allowed_models": "\n".join(token.allowed_models or ()),
    }


# -- showing and changing ------------------------------------------------------------------------


async def token_list(request: web.Request) -> web.Response:
    ops = operations(request)
    status = request.query.get("status", "")
    now = utcnow()
    tokens = [
        token
        for token in await ops.list_tokens()
        if status not in STATUSES or token.status(now) == status
    ]
    tokens.sort(key=lambda t: t.created_at, reverse=True)
    names = {project.id: project.name for project in await ops.list_projects()}
    return await render_long(
        request,
        "tokens.html",
        {"tokens": tokens, "names": names, "status": status, "statuses": STATUSES},
    )


async def _token_page(
    request: web.Request,
    token: Token,
    error: InvalidField | None = None,
    values: dict[str, str] | None = None,
    *,
    status: int = 400,
    shown: dict[str, str] | None = None,
) -> web.Response:
    ops = operations(request)
    # Tokens go with their project (ON DELETE CASCADE), so a token always has one.
    project = await ops.get_project(token.project_id)
    usage = await ops.token_usage(token.id)
    return render(
        request,
        "token_detail.html",
        {
            "token": token,
            "project": project,
            "usage": usage,
            "error": error,
            "values": values or limit_values(token),
            # What the limits form's boxes are compared with when posted (see _edited): the
            # limits as they are now, unless the form shown again came from an older page.
            "shown": shown or limit_values(token),
            "timelines": await timelines(ops.store, utcnow(), token_id=token.id),
        },
        status=status if error else 200,
    )


async def token_detail(request: web.Request) -> web.Response:
    token = await operations(request).get_token(request.match_info["token_id"])
    return await _token_page(request, token)


def _changes(token: Token, limits: LimitChanges) -> LimitChanges:
    """The limits that differ from the token's, so the audit log names only what changed."""
    shown = token.to_api()
    changed = {key: value for key, value in limits.items() if value != shown[key]}
    budget = limits.get("budget_usd")
    if budget is not None and nanousd(budget) == token.budget_nanousd:
        changed.pop("budget_usd", None)  # the same budget, typed with other digits
    return cast(LimitChanges, changed)


def _same(key: str, one: Any, other: Any) -> bool:
    if key == "budget_usd" and one is not None and other is not None:
        return bool(nanousd(one) == nanousd(other))  # the same amount, typed with other digits
    return bool(one == other)


def _edited(form: forms.Form, limits: LimitChanges) -> tuple[LimitChanges, LimitChanges]:
    """Of the limits posted, those the operator changed, and the values the page showed them.

    The form posts every box, also those left as the page showed them; sent on as they are, a
    page opened before someone else changed a limit would put the old limit back unseen (a quota
    cut through the API, lifted again by a save of the rpm). So a box is only a change when it
    differs from what its page showed, posted back in ``shown_<field>``.
    """
    shown = read_limits(
        {key: form[f"shown_{key}"] for key in LIMIT_FIELDS if f"shown_{key}" in form}
    )
    edited = {
        key: value
        for key, value in limits.items()
        if key not in shown or not _same(key, value, shown[key])  # type: ignore[literal-required]
    }
    return cast(LimitChanges, edited), shown


def _conflict(token: Token, edited: LimitChanges, shown: LimitChanges) -> InvalidField | None:
    """A limit the operator changed that someone else changed too since the page was shown."""
    current = token.to_api()
    for key, value in edited.items():
        if key not in shown:
            continue
        was = shown[key]  # type: ignore[literal-required]
        if not _same(key, current[key], was) and not _same(key, current[key], value):
            now = limit_values(token)[key].replace("\n", ", ") or "no limit"
            return InvalidField(
                key,
                f"changed since this page was opened; it is now {now}. Nothing was saved: check"
                " the limits and save again.",
            )
    return None


async def token_quota(request: web.Request) -> web.Response:
    """Set or clear (blank) the token's limits: requests, rates, budget, models."""
    ops = operations(request)
    token = await ops.get_token(request.match_info["token_id"])
    form = await forms.read_form(request)
    typed = {k: form[k] for k in LIMIT_FIELDS if k in form}
    try:
        limits, shown = _edited(form, read_limits(form))
    except InvalidField as exc:
        first_shown = {k: form[f"shown_{k}"] for k in LIMIT_FIELDS if f"shown_{k}" in form}
        return await _token_page(
            request, token, exc, {**limit_values(token), **typed}, shown=first_shown or None
        )
    if (conflict := _conflict(token, limits, shown)) is not None:
        # The limits as they are now, with the boxes the operator changed as they typed them:
        # saved again, having seen it, it applies.
        changed = {k: typed[k] for k in limits}
        return await _token_page(
            request, token, conflict, {**limit_values(token), **changed}, status=409
        )
    changes = _changes(token, limits)
    if changes:
        await ops.update_token(actor(request), token.id, limits=changes)
    see_other(request, "token", token_id=token.id, notice="quota_updated")


async def token_revoke_confirm(request: web.Request) -> web.Response:
    """Ask before revoking: a page of its own, so it works without JavaScript."""
    ops = operations(request)
    token = await ops.get_token(request.match_info["token_id"])
    if not token.is_active:
        see_other(request, "token", token_id=token.id)
    project = await ops.get_project(token.project_id)
    return render(request, "token_revoke.html", {"token": token, "project": project})


async def token_revoke(request: web.Request) -> web.Response:
    token = await operations(request).revoke_token(actor(request), request.match_info["token_id"])
    see_other(request, "token", token_id=token.id, notice="token_revoked")
