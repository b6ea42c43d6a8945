"""``llm-proxy manage …``: the management API from a terminal or a script.

The common options (``--manage-api-base-url``, ``--management-token``, ``--json``) are accepted on the
``manage`` group and on every leaf command, so both ``manage --json project list`` and
``manage project list --json`` work.
"""

from __future__ import annotations

import json
import math
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click
from click.core import ParameterSource
from rich.console import Console
from rich.table import Table

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_BASE_URL = "http://127.0.0.1:8080"


@dataclass
class ClientOptions:
    base_url: str = DEFAULT_BASE_URL
    management_token: str | None = None
    as_json: bool = False


class ManageError(click.ClickException):
    """Printed as one line and exits 1."""


class OptionError(click.ClickException):
    """An option's value is wrong, found before anything is sent: one line, exit 2 like click's
    own usage errors."""

    exit_code = 2


def _json_object(text: str, option: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise OptionError(f"{option}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise OptionError(f'{option}: must be a JSON object, e.g. \'{{"team": "search"}}\'')
    return value


def _common_options(func: F) -> F:
    func = click.option(
        "--json", "as_json", is_flag=True, default=None, help="Print JSON instead of a table."
    )(func)
    func = click.option(
        "--management-token",
        envvar="MANAGEMENT_TOKEN",
        show_envvar=True,
        help="Bearer token of the management API.",
    )(func)
    func = click.option(
        "--manage-api-base-url",
        envvar="MANAGE_API_BASE_URL",
        show_envvar=True,
        help=f"Base URL of the proxy [default: {DEFAULT_BASE_URL}].",
    )(func)
    return func


def _options(ctx: click.Context, /, overrides: dict[str, Any]) -> ClientOptions:
    parent: ClientOptions | None = ctx.find_object(ClientOptions)
    base = parent or ClientOptions()

    def pick(name: str, inherited: Any) -> Any:
        # A leaf reads the same environment variables as the group; only a flag typed on the leaf
        # may override what the group already settled (its own flag or the environment).
        value = overrides.pop(name, None)
        if value is None:
            return inherited
        if parent is None or ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE:
            return value
        return inherited if inherited is not None else value

    return ClientOptions(
        base_url=str(pick("manage_api_base_url", base.base_url)).rstrip("/"),
        management_token=pick("management_token", base.management_token),
        as_json=bool(pick("as_json", None) or base.as_json),
    )


def _call(opts: ClientOptions, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    if not opts.management_token:
        raise ManageError("no management token: pass --management-token or set MANAGEMENT_TOKEN")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        opts.base_url + path,
        data=data,
        method=method,
        headers={
            "Authorization": f"Bearer {opts.management_token}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = response.read()
    except urllib.error.HTTPError as exc:
        raise ManageError(_error_message(exc)) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ManageError(f"cannot reach {opts.base_url}: {reason}") from None
    return json.loads(payload) if payload else None


def _quote(identifier: str) -> str:
    """An id as one path segment: ``../tokens`` must not address another route."""
    return urllib.parse.quote(identifier, safe="")


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        error = json.loads(exc.read())["error"]
        return f"{error['message']} ({exc.code} {error['code']})"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {exc.code} {exc.reason}"


def _print_table(rows: list[dict[str, Any]], columns: list[str], title: str) -> None:
    table = Table(title=title, title_justify="left", show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    # Off a terminal rich assumes 80 columns and folds ids mid-value; give a pipe the full width.
    width = None if sys.stdout.isatty() else 10_000
    Console(file=sys.stdout, soft_wrap=True, width=width).print(table)


def _print_record(record: dict[str, Any]) -> None:
    width = max(len(k) for k in record)
    for key, value in record.items():
        shown = json.dumps(value) if isinstance(value, dict | list) else value
        click.echo(f"{key.ljust(width)}  {'' if shown is None else shown}")


def _emit(
    opts: ClientOptions, data: Any, *, columns: list[str] | None = None, title: str = ""
) -> None:
    if opts.as_json:
        click.echo(json.dumps(data, indent=2))
    elif isinstance(data, list):
        if not data:
            click.echo(f"No {title.lower() or 'rows'}.")
        else:
            _print_table(data, columns or list(data[0]), title)
    elif isinstance(data, dict):
        _print_record(data)


@click.group()
@_common_options
@click.pass_context
def manage(ctx: click.Context, /, **options: Any) -> None:
    """Manage projects and tokens through the management API."""
    ctx.obj = _options(ctx, options)


@manage.group()
def project() -> None:
    """Projects hold the real upstream key."""


PROJECT_COLUMNS = ["id", "name", "is_active", "api_key", "created_at"]
TOKEN_COLUMNS = [
    "id",
    "project_id",
    "status",
    "is_active",
    "expires_at",
    "request_count",
    "max_requests",
    "spent_usd",
    "budget_usd",
]


@project.command("create")
@click.option("--name", required=True)
@click.option("--api-key", required=True, help="The real upstream key; stored encrypted.")
@click.option("--description", default=None)
@click.option("--metadata", default=None, help="A JSON object.")
@_common_options
@click.pass_context
def project_create(
    ctx: click.Context,
    /,
    name: str,
    api_key: str,
    description: str | None,
    metadata: str | None,
    **o: Any,
) -> None:
    """Create a project."""
    opts = _options(ctx, o)
    body: dict[str, Any] = {"name": name, "api_key": api_key}
    if description is not None:
        body["description"] = description
    if metadata is not None:
        body["metadata"] = _json_object(metadata, "--metadata")
    _emit(opts, _call(opts, "POST", "/manage/projects", body))


@project.command("list")
@_common_options
@click.pass_context
def project_list(ctx: click.Context, /, **o: Any) -> None:
    """List projects."""
    opts = _options(ctx, o)
    _emit(opts, _call(opts, "GET", "/manage/projects"), columns=PROJECT_COLUMNS, title="Projects")


@project.command("get")
@click.argument("project_id")
@_common_options
@click.pass_context
def project_get(ctx: click.Context, /, project_id: str, **o: Any) -> None:
    """Show one project."""
    opts = _options(ctx, o)
    _emit(opts, _call(opts, "GET", f"/manage/projects/{_quote(project_id)}"))


@project.command("update")
@click.argument("project_id")
@click.option("--name", default=None)
@click.option("--api-key", default=None)
@click.option("--description", default=None)
@click.option("--active/--inactive", "is_active", default=None, help="Activate or deactivate.")
@click.option("--revoke-tokens", is_flag=True, default=False, help="Also revoke all its tokens.")
@_common_options
@click.pass_context
def project_update(
    ctx: click.Context,
    /,
    project_id: str,
    name: str | None,
    api_key: str | None,
    description: str | None,
    is_active: bool | None,
    revoke_tokens: bool,
    **o: Any,
) -> None:
    """Change a project's name, key, description or state."""
    opts = _options(ctx, o)
    body: dict[str, Any] = {
        k: v
        for k, v in {
            "name": name,
            "api_key": api_key,
            "description": description,
            "is_active": is_active,
        }.items()
        if v is not None
    }
    if revoke_tokens:
        body["revoke_tokens"] = True
    if not body:
        raise click.UsageError("nothing to update: give at least one option")
    _emit(opts, _call(opts, "PATCH", f"/manage/projects/{_quote(project_id)}", body))


@project.command("delete")
@click.argument("project_id")
@_common_options
@click.pass_context
def project_delete(ctx: click.Context, /, project_id: str, **o: Any) -> None:
    """Delete a project; its tokens stop working at once."""
    opts = _options(ctx, o)
    _call(opts, "DELETE", f"/manage/projects/{_quote(project_id)}")
    if opts.as_json:
        click.echo(json.dumps({"deleted": project_id}))
    else:
        click.echo(f"Deleted project {project_id}.")


@manage.group()
def token() -> None:
    """Withering tokens: short-lived, revocable, with an optional request quota."""


def _limit_options(func: F) -> F:
    """The limits ``generate`` sets and ``update`` changes (the server checks their ranges)."""
    func = click.option(
        "--allowed-model",
        "allowed_models",
        multiple=True,
        metavar="GLOB",
        help="A model the token may use, as a glob (e.g. 'gpt-4o*'); repeat for several.",
    )(func)
    func = click.option(
        "--budget-usd",
        type=float,
        default=None,
        help="Lifetime spend limit in US dollars (e.g. 5 or 0.25).",
    )(func)
    func = click.option(
        "--tpm", type=int, default=None, help="Tokens (prompt + completion) per rolling minute."
    )(func)
    func = click.option("--rpm", type=int, default=None, help="Requests per rolling minute.")(func)
    func = click.option(
        "--max-requests", type=int, default=None, help="Requests over the token's lifetime."
    )(func)
    return func


def _limits_body(
    max_requests: int | None,
    rpm: int | None,
    tpm: int | None,
    budget_usd: float | None,
    allowed_models: tuple[str, ...],
) -> dict[str, Any]:
    if budget_usd is not None and not math.isfinite(budget_usd):
        raise OptionError("--budget-usd: must be a number of dollars")
    given = {"max_requests": max_requests, "rpm": rpm, "tpm": tpm, "budget_usd": budget_usd}
    body: dict[str, Any] = {key: value for key, value in given.items() if value is not None}
    if allowed_models:
        body["allowed_models"] = list(allowed_models)
    return body


@token.command("generate")
@click.option("--project-id", required=True)
@click.option(
    "--duration", "duration_minutes", type=int, default=60, help="Lifetime in minutes (1..525600)."
)
@_limit_options
@click.option(
    "--metadata",
    default=None,
    help='A JSON object kept with the token, e.g. \'{"user": "ada"}\'; fixed once issued.',
)
@_common_options
@click.pass_context
def token_generate(
    ctx: click.Context,
    /,
    project_id: str,
    duration_minutes: int,
    max_requests: int | None,
    rpm: int | None,
    tpm: int | None,
    budget_usd: float | None,
    allowed_models: tuple[str, ...],
    metadata: str | None,
    **o: Any,
) -> None:
    """Issue a token; its value is shown only now."""
    opts = _options(ctx, o)
    body: dict[str, Any] = {
        "project_id": project_id,
        "duration_minutes": duration_minutes,
        **_limits_body(max_requests, rpm, tpm, budget_usd, allowed_models),
    }
    if metadata is not None:
        body["metadata"] = _json_object(metadata, "--metadata")
    _emit(opts, _call(opts, "POST", "/manage/tokens", body))


@token.command("list")
@click.option("--project-id", default=None)
@_common_options
@click.pass_context
def token_list(ctx: click.Context, /, project_id: str | None, **o: Any) -> None:
    """List tokens (never their values)."""
    opts = _options(ctx, o)
    path = "/manage/tokens" + (f"?project_id={_quote(project_id)}" if project_id else "")
    _emit(opts, _call(opts, "GET", path), columns=TOKEN_COLUMNS, title="Tokens")


@token.command("get")
@click.argument("token_id")
@_common_options
@click.pass_context
def token_get(ctx: click.Context, /, token_id: str, **o: Any) -> None:
    """Show one token."""
    opts = _options(ctx, o)
    _emit(opts, _call(opts, "GET", f"/manage/tokens/{_quote(token_id)}"))


@token.command("revoke")
@click.argument("token_id", required=False)
@click.option("--value", default=None, help="Revoke by the token value instead of its id.")
@click.option("--project-id", default=None, help="Revoke every token of this project.")
@_common_options
@click.pass_context
def token_revoke(
    ctx: click.Context, /, token_id: str | None, value: str | None, project_id: str | None, **o: Any
) -> None:
    """Revoke a token by id, by value, or all tokens of a project."""
    opts = _options(ctx, o)
    if sum(x is not None for x in (token_id, value, project_id)) != 1:
        raise click.UsageError("give exactly one of TOKEN_ID, --value or --project-id")
    if project_id is not None:
        counts = _call(opts, "POST", f"/manage/projects/{_quote(project_id)}/tokens/revoke")
        _emit(opts, counts)
        return
    if value is not None:
        _call(opts, "DELETE", "/manage/tokens", {"token": value})
        target = "the token"
    else:
        _call(opts, "DELETE", f"/manage/tokens/{_quote(token_id or '')}")
        target = f"token {token_id}"
    if opts.as_json:
        click.echo(json.dumps({"revoked": token_id or True}))
    else:
        click.echo(f"Revoked {target}.")


@token.command("update")
@click.argument("token_id")
@click.option("--active/--inactive", "is_active", default=None, help="Reactivate or deactivate.")
@_limit_options
@click.option("--no-max-requests", is_flag=True, help="Remove the lifetime request limit.")
@click.option("--no-rpm", is_flag=True, help="Remove the requests-per-minute limit.")
@click.option("--no-tpm", is_flag=True, help="Remove the tokens-per-minute limit.")
@click.option("--no-budget", is_flag=True, help="Remove the spend limit.")
@click.option("--any-model", is_flag=True, help="Allow every model again.")
@_common_options
@click.pass_context
def token_update(
    ctx: click.Context,
    /,
    token_id: str,
    is_active: bool | None,
    max_requests: int | None,
    rpm: int | None,
    tpm: int | None,
    budget_usd: float | None,
    allowed_models: tuple[str, ...],
    no_max_requests: bool,
    no_rpm: bool,
    no_tpm: bool,
    no_budget: bool,
    any_model: bool,
    **o: Any,
) -> None:
    """Change a token's state or limits; options left out keep their value."""
    opts = _options(ctx, o)
    body = _limits_body(max_requests, rpm, tpm, budget_usd, allowed_models)
    clears = {
        "max_requests": ("--no-max-requests", no_max_requests),
        "rpm": ("--no-rpm", no_rpm),
        "tpm": ("--no-tpm", no_tpm),
        "budget_usd": ("--no-budget", no_budget),
        "allowed_models": ("--any-model", any_model),
    }
    for field, (flag, clear) in clears.items():
        if not clear:
            continue
        if field in body:
            raise click.UsageError(f"{flag} contradicts setting {field}: give one or the other")
        body[field] = None
    if is_active is not None:
        body["is_active"] = is_active
    if not body:
        raise click.UsageError("nothing to update: give at least one option")
    _emit(opts, _call(opts, "PATCH", f"/manage/tokens/{_quote(token_id)}", body))
