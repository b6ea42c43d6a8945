"""``llm-proxy manage …``: the management API from a terminal or a script.

On the machine that runs the server, ``manage`` finds it on its own: the base URL follows the
server's ``LISTEN_ADDR`` and the token is the one the server generated under ``DATA_DIR``. A flag or
``MANAGE_API_BASE_URL`` / ``MANAGEMENT_TOKEN`` overrides either.

The common options are accepted on the ``manage`` group and on every leaf command, so both
``manage --json project list`` and ``manage project list --json`` work.
"""

from __future__ import annotations

import http.client
import ipaddress
import itertools
import json
import math
import re
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import IO, Any, TypeVar

import click
from click.core import ParameterSource

from llm_proxy.crypto import redact
from llm_proxy.json_keys import unrepeated_keys
from llm_proxy.listen_addr import listen_url, parse_listen_addr
from llm_proxy.secret_input import (
    ON_THE_COMMAND_LINE,
    ask_secret,
    configured_token,
    secret_option_value,
)

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
DEFAULT_LISTEN_ADDR = "127.0.0.1:8080"
DEFAULT_DATA_DIR = "./data"
# The file under DATA_DIR the server keeps the management token it generated in. The server's
# secrets store is in a layer above this one, so it takes the name from here.
MANAGEMENT_TOKEN_FILE = "management_token"
# The path every call of the management API starts with.
API_PATH = "/manage"
# Lists show ids cut to this many characters (longer where two would collide); an id given on the
# command line may be any prefix at least MIN_PREFIX long that names exactly one record.
SHORT_ID = 8
MIN_PREFIX = 4

EXIT_CODES_HELP = (
    "Exit status 0: done; 1: the server refused or could not be reached, or the answer was no;"
    " 2: the command line is wrong, nothing changed. Under --json an error is one JSON object on"
    ' stderr: {"error": {"message": …, "code": …, "status": the HTTP status, if any}}.'
)


@dataclass(frozen=True)
class ClientOptions:
    """The common options as given by a flag or the environment; None where neither gave one."""

    base_url: str | None = None
    listen_addr: str | None = None
    management_token: str | None = None
    # Where management_token came from, for a message when the server refuses it.
    management_token_from: str | None = None
    data_dir: str | None = None
    as_json: bool = False


@dataclass(frozen=True)
class Connection:
    base_url: str
    token: str
    # What to check when the server cannot be reached, or refuses the token.
    url_hint: str
    token_from: str
    # The URL follows the server's LISTEN_ADDR: it names this machine, whatever its address.
    on_this_machine: bool = False


class ManageError(click.ClickException):
    """The server refused or could not be reached, no token was found, or the operator said no:
    one line (JSON under ``--json``), exit 1."""

    def __init__(
        self,
        message: str,
        *,
        code: str | None = "error",
        status: int | None = None,
        plain: str = "",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        # The message without what JSON carries in fields of its own (the status and code).
        self.plain = plain or message


class OptionError(ManageError):
    """The command line is wrong, found before anything changed: exit 2 like click's own usage
    errors."""

    exit_code = 2

    def __init__(self, message: str, *, code: str = "invalid_option") -> None:
        super().__init__(message, code=code)


class JsonError(click.ClickException):
    """Any error of a ``--json`` command, shown as one JSON object on stderr; same exit status."""

    def __init__(self, error: click.ClickException) -> None:
        super().__init__(error.format_message())
        message, status = error.format_message(), None
        if isinstance(error, ManageError):
            message, code, status = error.plain, error.code, error.status
        elif isinstance(error, click.MissingParameter):
            code = "missing_option"
        elif isinstance(error, click.BadParameter):
            code = "invalid_option"
        else:
            code = "usage_error"
        self.body: dict[str, Any] = {"message": message, "code": code}
        if status is not None:
            self.body["status"] = status

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(json.dumps({"error": self.body}), err=True)


class JsonUsageError(JsonError):
    """A JsonError for a wrong command line (click's exit status is a class attribute)."""

    exit_code = 2


def _json_wanted(ctx: click.Context | None) -> bool:
    while ctx is not None:
        if ctx.params.get("as_json"):
            return True
        ctx = ctx.parent
    return False


@contextmanager
def _errors_as_json(wanted: Callable[[], bool]) -> Iterator[None]:
    try:
        yield
    except JsonError:
        raise
    except click.ClickException as exc:
        if not wanted():
            raise
        raise (JsonUsageError if exc.exit_code == 2 else JsonError)(exc) from None


# In a context's meta (shared by the whole chain of a command line): ``--json`` was typed.
_JSON_TYPED = "llm_proxy.manage.json_typed"


class _JsonErrors(click.Command):
    """Errors, usage errors included, as JSON under ``--json``."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        # The flag as typed: a usage error stops parsing before ``--json`` is known to click.
        typed = "--json" in args
        with _errors_as_json(lambda: typed or _json_wanted(parent)):
            ctx = super().make_context(info_name, args, parent, **extra)
        # Kept for invoke: a group's subcommand named wrong (``project lsit --json``) is found
        # there, before the leaf that would have parsed the flag exists.
        ctx.meta[_JSON_TYPED] = typed or ctx.meta.get(_JSON_TYPED, False)
        return ctx

    def invoke(self, ctx: click.Context) -> Any:
        with _errors_as_json(lambda: _json_wanted(ctx) or ctx.meta.get(_JSON_TYPED, False)):
            return super().invoke(ctx)


class ManageCommand(_JsonErrors):
    """A ``manage`` command."""


class ManageGroup(_JsonErrors, click.Group):
    """``manage`` and its groups: their commands and subgroups report errors as ManageCommand."""

    command_class = ManageCommand
    group_class = type


def _not_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite_number(text: str) -> float:
    # Python reads 1e400 as infinity and would send it as Infinity, which is not JSON.
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is too large for a number")
    return number


def _json_object(text: str, option: str) -> dict[str, Any]:
    # JSON as the server reads it: Python's reader also takes NaN and Infinity, and numbers too
    # large for a double (which the server refuses as a body that is not JSON at all), and keeps
    # the last of a repeated key (which the server refuses as ambiguous).
    try:
        value = json.loads(
            text,
            parse_constant=_not_json_constant,
            parse_float=_finite_number,
            object_pairs_hook=unrepeated_keys,
        )
    except ValueError as exc:
        raise OptionError(f"{option}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise OptionError(f'{option}: must be a JSON object, e.g. \'{{"team": "search"}}\'')
    return value


def _common_options(func: F) -> F:
    func = click.option(
        "--json",
        "as_json",
        is_flag=True,
        default=None,
        help="Print JSON instead of a table; an error too (on stderr).",
    )(func)
    func = click.option(
        "--data-dir",
        envvar="DATA_DIR",
        show_envvar=True,
        show_default=DEFAULT_DATA_DIR,
        help="The server's DATA_DIR, where the token it generated is read from.",
    )(func)
    func = click.option(
        "--management-token",
        envvar="MANAGEMENT_TOKEN",
        show_envvar=True,
        show_default=f"the one in <DATA_DIR>/{MANAGEMENT_TOKEN_FILE}",
        help="Bearer token of the management API. On the command line it is visible to other"
        " users of this machine (ps): prefer MANAGEMENT_TOKEN, or the file.",
    )(func)
    func = click.option(
        "--listen-addr",
        envvar="LISTEN_ADDR",
        show_envvar=True,
        show_default=DEFAULT_LISTEN_ADDR,
        help="The server's LISTEN_ADDR, the URL's default (0.0.0.0 and :: via loopback).",
    )(func)
    func = click.option(
        "--manage-api-base-url",
        envvar="MANAGE_API_BASE_URL",
        show_envvar=True,
        show_default="http://<LISTEN_ADDR>",
        help="The server's URL, or its /manage URL; host:port alone means http://host:port.",
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

    token = pick("management_token", base.management_token)
    if token is base.management_token:  # pick keeps the inherited object itself
        token_from = base.management_token_from
    elif ctx.get_parameter_source("management_token") is ParameterSource.COMMANDLINE:
        token_from = "--management-token"
    else:
        token_from = "MANAGEMENT_TOKEN in the environment"
    return ClientOptions(
        base_url=pick("manage_api_base_url", base.base_url),
        listen_addr=pick("listen_addr", base.listen_addr),
        management_token=token,
        management_token_from=token_from,
        data_dir=pick("data_dir", base.data_dir),
        as_json=bool(pick("as_json", None) or base.as_json),
    )


# The user name and password of a URL: everything of its authority up to its last "@".
_USERINFO = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*://)?)[^/?#]*@")


def _shown(url: str) -> str:
    """``url`` as a message may print it: without a user name or password."""
    return _USERINFO.sub(r"\1", url)


def _checked_base_url(value: str) -> str:
    url = value.strip()
    if "://" not in url:
        url = "http://" + url  # a bare host:port, as curl takes it
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check
        usable = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # a bad port, or a bracketed IPv6 address that is not one
        usable = False
    if not usable:
        raise OptionError(
            "--manage-api-base-url / MANAGE_API_BASE_URL: expected the server's URL, such as"
            f" http://127.0.0.1:8080, got {_shown(value.strip())!r}"
        )
    if "@" in parts.netloc:
        # urllib would not send them: it would look the whole "user:password@host" up in DNS.
        raise OptionError(
            "--manage-api-base-url / MANAGE_API_BASE_URL: a user name or password in the URL is"
            " not supported (the management token is the credential); give"
            f" {_shown(url)!r} and the token in MANAGEMENT_TOKEN"
        )
    if "?" in url or "#" in url:
        # Each call's path is appended to the URL: after a query or fragment it would ask the
        # server for something else than the command names.
        alone = urllib.parse.urlunsplit(parts._replace(query="", fragment=""))
        raise OptionError(
            "--manage-api-base-url / MANAGE_API_BASE_URL: a query or fragment in the URL is not"
            f" supported; give the server's URL alone, such as {_shown(alone)!r}"
        )
    base = url.rstrip("/")
    # The option names the management API's base: given as such (…/manage), the server's URL is
    # what is before it, or every call would go to /manage/manage/….
    if parts.path.rstrip("/").endswith(API_PATH):
        base = base.removesuffix(API_PATH)
    return base


def _url_of_listen_addr(value: str) -> str:
    """The URL of a server listening at ``value``, read as the server reads it."""
    try:
        host, port = parse_listen_addr(value.strip())
    except ValueError:
        port = 0
    if port == 0:
        raise OptionError(
            f"LISTEN_ADDR: expected host:port such as 127.0.0.1:8080, got {value!r};"
            " or give the server's URL with --manage-api-base-url"
        )
    # A server listening on every interface answers on loopback.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return listen_url(host, port)


def _connection(opts: ClientOptions) -> Connection:
    elsewhere = "point elsewhere with --manage-api-base-url or MANAGE_API_BASE_URL"
    on_this_machine = not opts.base_url
    if opts.base_url:
        base_url = _checked_base_url(opts.base_url)
        url_hint = "check --manage-api-base-url / MANAGE_API_BASE_URL"
    elif opts.listen_addr:
        base_url = _url_of_listen_addr(opts.listen_addr)
        url_hint = f"is the server running? (URL from LISTEN_ADDR={opts.listen_addr}; {elsewhere})"
    else:
        base_url = _url_of_listen_addr(DEFAULT_LISTEN_ADDR)
        url_hint = (
            "is the server running? (LISTEN_ADDR is not set, so its default was tried; set it"
            f" as the server has it, or {elsewhere})"
        )
    if opts.management_token and opts.management_token.strip():
        token_from = opts.management_token_from or "--management-token"
        token = _usable_token(opts.management_token)
        return Connection(base_url, token, url_hint, token_from, on_this_machine)
    path = Path(opts.data_dir or DEFAULT_DATA_DIR) / MANAGEMENT_TOKEN_FILE
    try:
        # Bytes that are not UTF-8 become U+FFFD, which the token check refuses in one line.
        text = path.read_text(encoding="utf-8", errors="replace")
        token = _usable_token(text, f"the management token in {path}")
    except FileNotFoundError:
        token = ""
    except OSError as exc:
        raise ManageError(
            f"cannot read the management token in {path}: {exc.strerror};"
            " run as the server's user, or set MANAGEMENT_TOKEN",
            code="no_management_token",
        ) from None
    if not token:
        raise ManageError(
            f"no management token: set MANAGEMENT_TOKEN (--management-token too, but other users"
            f" see it in ps; there is none in {path}: set DATA_DIR as the server has it to use the"
            " one it generated)",
            code="no_management_token",
        )
    return Connection(base_url, token, url_hint, f"the file {path}", on_this_machine)


def _usable_token(value: str, name: str = "--management-token / MANAGEMENT_TOKEN") -> str:
    """The token without the whitespace around it, as the server takes its own; one that no
    HTTP header can carry is refused without being shown."""
    try:
        return configured_token(name, value)
    except ValueError as exc:
        raise OptionError(str(exc), code="invalid_management_token") from None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx stays an answer: following it would turn a POST into a GET that creates nothing, and
    send the management token to whatever host the redirect names."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Message,
        newurl: str,
    ) -> None:
        return None


# The default handlers (proxies from the environment, https) but for the redirect handler.
_OPENER = urllib.request.build_opener(_NoRedirects)
# The same without proxies. A proxy of HTTP_PROXY (set for the server's egress, say) would get a
# loopback request in clear, management token, key and token values included; curl, too, never
# sends localhost through one.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects)


def _is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (also as ::ffff:127.x.y.z) and localhost: this machine."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _opener(connection: Connection) -> urllib.request.OpenerDirector:
    """Direct to this machine (loopback, or the server's LISTEN_ADDR, even on another of its
    addresses); elsewhere through the environment's proxies, as urllib does (an operator may
    need one to reach a remote management API)."""
    host = urllib.parse.urlsplit(connection.base_url).hostname or ""
    return _DIRECT if connection.on_this_machine or _is_loopback(host) else _OPENER


# What an answer must hold for the commands to use it: its fields and the types each may have.
Fields = dict[str, tuple[type, ...]]
_ANY: tuple[type, ...] = (object,)
_TEXT: tuple[type, ...] = (str,)
_TIME: tuple[type, ...] = (str, type(None))
PROJECT: Fields = {
    "id": _TEXT,
    "name": _ANY,
    "is_active": _ANY,
    "api_key": _ANY,
    "created_at": _TIME,
}
TOKEN: Fields = {
    "id": _TEXT,
    "project_id": _TEXT,
    "status": _ANY,
    "expires_at": _TIME,
    "request_count": _ANY,
    "max_requests": _ANY,
    "spent_usd": (int, float),
    "budget_usd": (int, float, type(None)),
}
ISSUED: Fields = {"id": _TEXT, "token": _TEXT}
REVOKED: Fields = {"revoked_count": _ANY}


def _holds(record: Any, fields: Fields) -> bool:
    return isinstance(record, dict) and all(
        name in record and isinstance(record[name], types) for name, types in fields.items()
    )


def _call(
    opts: ClientOptions,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    answer: Fields | None = None,
    many: bool = False,
) -> Any:
    """The parsed answer, which must be a record holding ``answer`` (a list of them when
    ``many``), or anything at all when ``answer`` is None."""
    connection = _connection(opts)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        connection.base_url + path,
        data=data,
        method=method,
        headers={
            "Authorization": f"Bearer {connection.token}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        },
    )
    try:
        with _opener(connection).open(request, timeout=30) as response:
            payload = response.read()
            status, content_type = response.status, response.headers.get("Content-Type")
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:
            raise _redirect_error(exc, connection) from None
        raise _api_error(exc, connection) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ManageError(
            f"cannot reach {connection.base_url} ({reason}): {connection.url_hint}",
            code="unreachable",
        ) from None
    except http.client.HTTPException:
        # Something that is not an HTTP server answers there (an SSH daemon, say).
        raise _not_the_api(connection, None) from None
    try:
        data = json.loads(payload) if payload else None
    except ValueError:
        # Something else answers at that URL: a login page in front of it, another server.
        raise ManageError(
            f"{connection.base_url} answered {status} with {content_type or 'a body'} that is not"
            " JSON, so it is not the management API: check --manage-api-base-url /"
            " MANAGE_API_BASE_URL",
            code="not_json",
            status=status,
        ) from None
    if answer is not None:
        records = data if many and isinstance(data, list) else [data]
        if (many and not isinstance(data, list)) or not all(_holds(r, answer) for r in records):
            raise _not_the_api(connection, status)
    return data


def _not_the_api(connection: Connection, status: int | None) -> ManageError:
    return ManageError(
        f"the server at {connection.base_url} did not answer as the llm-proxy management API"
        " does: check --manage-api-base-url / MANAGE_API_BASE_URL",
        code="unexpected_answer",
        status=status,
    )


def _redirect_error(exc: urllib.error.HTTPError, connection: Connection) -> ManageError:
    location = exc.headers.get("Location")
    exc.close()
    # A relative Location is shown as the URL it names, which the operator can pass as is.
    where = (
        f"Location {_shown(urllib.parse.urljoin(exc.url, location))}" if location else "no Location"
    )
    plain = (
        f"{connection.base_url} answered a redirect ({exc.code}, {where}), which is not followed:"
        " nothing was done and the management token was sent nowhere else; give the management"
        " API's own URL with --manage-api-base-url or MANAGE_API_BASE_URL"
    )
    return ManageError(plain, code="redirected", status=exc.code)


def _api_error(exc: urllib.error.HTTPError, connection: Connection) -> ManageError:
    try:
        error = json.loads(exc.read())["error"]
        plain, given = str(error["message"]), error["code"]
        # The shape lets the code be null: then there is none to show.
        code = None if given is None else str(given)
    except (ValueError, KeyError, TypeError):
        plain, code = f"HTTP {exc.code} {exc.reason}", f"http_{exc.code}"
    finally:
        exc.close()
    if exc.code == 401:
        plain = f"{plain.rstrip('.')}; the token came from {connection.token_from}"
    status = f"{exc.code} {code}" if code is not None else str(exc.code)
    message = plain if plain.startswith("HTTP ") else f"{plain} ({status})"
    return ManageError(message, code=code, status=exc.code, plain=plain)


def _quote(identifier: str) -> str:
    """An id as one path segment: ``../tokens`` must not address another route."""
    return urllib.parse.quote(identifier, safe="")


# -- ids: whole, or a prefix as the lists show them ----------------------------------------------


@dataclass(frozen=True)
class Kind:
    name: str
    path: str
    not_found: str
    fields: Fields


PROJECTS = Kind("project", "/manage/projects", "project_not_found", PROJECT)
TOKENS = Kind("token", "/manage/tokens", "token_not_found", TOKEN)


def _by_prefix(opts: ClientOptions, kind: Kind, prefix: str) -> str | None:
    """The one id that begins with ``prefix``; None when none does; an error when several do."""
    if len(prefix) < MIN_PREFIX:
        return None
    ids = sorted(str(r["id"]) for r in _call(opts, "GET", kind.path, answer=kind.fields, many=True))
    matches = [i for i in ids if i.startswith(prefix)]
    if len(matches) > 1:
        raise OptionError(
            f"{kind.name} id {prefix!r} is ambiguous: {len(matches)} {kind.name}s' ids begin with"
            f" it ({', '.join(matches[:4])}{', …' if len(matches) > 4 else ''}); give more of it",
            code="ambiguous_id",
        )
    return matches[0] if matches else None


def _with_id(opts: ClientOptions, kind: Kind, given: str, call: Callable[[str], T]) -> T:
    """``call`` with the id given, or, when that names nothing, the one id it is a prefix of.

    Only a 404 leads to the retry, so nothing happened on the first attempt.
    """
    if redact(given) != given:
        # Pasted where an id goes, a token's value (or one with "Bearer " before it, or another
        # secret of that shape) would travel in a URL (access logs, proxies) and come back in the
        # error; no id holds one, so it is not sent at all.
        hint = (
            "revoke a token by value with `token revoke --value -` (it reads the value from stdin)"
            if kind is TOKENS
            else f"give the {kind.name}'s id, as `{kind.name} list` shows it"
        )
        raise OptionError(
            f"that is a token's value, not a {kind.name} id: nothing was sent; {hint}",
            code="token_value_as_id",
        )
    try:
        return call(given)
    except ManageError as exc:
        if exc.code != kind.not_found:
            raise
        full = _by_prefix(opts, kind, given)
        if full is None:
            raise
    return call(full)


def _get(opts: ClientOptions, kind: Kind, given: str) -> dict[str, Any]:
    record: dict[str, Any] = _with_id(
        opts,
        kind,
        given,
        lambda i: _call(opts, "GET", f"{kind.path}/{_quote(i)}", answer=kind.fields),
    )
    return record


def _shortener(ids: Iterable[str]) -> Callable[[str], str]:
    """Ids cut to SHORT_ID characters, or as many more as keep any two apart."""
    length = SHORT_ID
    for a, b in itertools.pairwise(sorted(set(ids))):
        pairs = enumerate(zip(a, b, strict=False))
        shared = next((n for n, (x, y) in pairs if x != y), min(len(a), len(b)))
        length = max(length, shared + 1)
    return lambda identifier: identifier[:length]


# -- confirmation -------------------------------------------------------------------------------


def _needs_asking(yes: bool) -> bool:
    """Whether to ask before ``action``: on a terminal only. A script (stdin not a terminal)
    runs the command as SPEC §9 gives it, with nobody there to answer a question."""
    return not yes and sys.stdin.isatty()


def _confirm(question: str) -> None:
    # Asked on stderr and read from stdin, so stdout holds only the result (JSON under --json).
    click.echo(f"{question} [y/N]: ", nl=False, err=True)
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise ManageError("cancelled; nothing was changed", code="cancelled")


def _yes_option(func: F) -> F:
    return click.option(
        "--yes",
        "-y",
        is_flag=True,
        help="Do it without asking on a terminal (a script is never asked).",
    )(func)


# -- output -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[dict[str, Any]], str]


# Control characters (C0, DEL, C1), the Unicode line and paragraph separators, and the bidi
# embeddings, overrides and isolates: one in a name reorders the rest of its line, the columns
# after it included, on a terminal.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _printable(text: str) -> str:
    """Text from the server as one line of plain text: a control character in a name (stored
    before the API refused them) shown as its escape, so it can neither start a forged row nor
    reach the terminal as an escape sequence, nor a bidi control reorder the columns."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return _printable(",".join(str(v) for v in value)) or "-"
    if isinstance(value, dict):
        return json.dumps(value)
    return _printable(str(value))


def _minute(timestamp: str | None) -> str:
    """``2025-06-01T12:00:00.000000Z`` → ``2025-06-01 12:00Z`` (the API's times are UTC)."""
    return f"{timestamp[:10]} {timestamp[11:16]}Z" if timestamp else "-"


def _usd(value: float) -> str:
    # To the nano-dollar the server keeps: fewer digits show a budget of less than half a
    # micro-dollar as 0, which reads as spent.
    return f"{value:.9f}".rstrip("0").rstrip(".")


def _maybe(show: Callable[[Any], str], value: Any) -> str | None:
    return None if value is None else show(value)


def _of(used: str, limit: str | None) -> str:
    """What was used, and of how much when there is a limit."""
    return used if limit is None else f"{used}/{limit}"


def _project_columns(rows: list[dict[str, Any]]) -> tuple[list[Column], int]:
    short = _shortener(r["id"] for r in rows)
    columns = [
        Column("id", lambda r: short(r["id"])),
        Column("name", lambda r: _text(r["name"])),
        Column("status", lambda r: "active" if r["is_active"] else "inactive"),
        Column("api_key", lambda r: _text(r["api_key"])),
        Column("created", lambda r: _minute(r["created_at"])),
    ]
    return columns, 1


def _token_columns(rows: list[dict[str, Any]]) -> tuple[list[Column], int]:
    short = _shortener(r["id"] for r in rows)
    short_project = _shortener(r["project_id"] for r in rows)
    columns = [
        Column("id", lambda r: short(r["id"])),
        Column("project", lambda r: short_project(r["project_id"])),
        Column("status", lambda r: _text(r["status"])),
        Column("expires", lambda r: _minute(r["expires_at"])),
        Column("requests", lambda r: _of(str(r["request_count"]), _maybe(str, r["max_requests"]))),
        Column("spent_usd", lambda r: _of(_usd(r["spent_usd"]), _maybe(_usd, r["budget_usd"]))),
    ]
    return columns, 1


def _field(name: str) -> Column:
    return Column(name, lambda r: _text(r.get(name)))


def _wide_columns(fields: list[str]) -> Callable[[list[dict[str, Any]]], tuple[list[Column], None]]:
    def columns(_rows: list[dict[str, Any]]) -> tuple[list[Column], None]:
        return [_field(f) for f in fields], None

    return columns


PROJECT_FIELDS = ["id", "name", "is_active", "api_key", "description", "created_at", "updated_at"]
TOKEN_FIELDS = [
    "id",
    "project_id",
    "status",
    "is_active",
    "expires_at",
    "request_count",
    "max_requests",
    "rpm",
    "tpm",
    "spent_usd",
    "budget_usd",
    "allowed_models",
    "created_at",
    "last_used_at",
]
Layout = Callable[[list[dict[str, Any]]], tuple[list[Column], int | None]]


def _table(rows: list[dict[str, Any]], layout: Layout) -> str:
    """Columns two spaces apart; outside ``--wide``, the ``flexible`` column (a name) is cut to fit
    the terminal, or 80 columns off one."""
    columns, flexible = layout(rows)
    cells = [[c.header for c in columns], *([c.cell(r) for c in columns] for r in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    if flexible is not None:
        room = shutil.get_terminal_size().columns if sys.stdout.isatty() else 80
        excess = sum(widths) + 2 * (len(widths) - 1) - room
        if excess > 0:
            widths[flexible] = max(widths[flexible] - excess, len(columns[flexible].header), 8)
    lines = []
    for row in cells:
        fitted = [c if len(c) <= w else c[: w - 1] + "…" for c, w in zip(row, widths, strict=True)]
        lines.append("  ".join(c.ljust(w) for c, w in zip(fitted, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _print_record(record: dict[str, Any]) -> None:
    width = max(len(k) for k in record)
    for key, value in record.items():
        shown = json.dumps(value) if isinstance(value, dict | list) else value
        click.echo(f"{key.ljust(width)}  {'' if shown is None else _printable(str(shown))}")


def _emit(opts: ClientOptions, data: Any) -> None:
    if opts.as_json:
        click.echo(json.dumps(data, indent=2))
    elif isinstance(data, dict):
        _print_record(data)


def _emit_list(opts: ClientOptions, rows: list[dict[str, Any]], layout: Layout, noun: str) -> None:
    if opts.as_json:
        click.echo(json.dumps(rows, indent=2))
    elif not rows:
        click.echo(f"No {noun}.")
    else:
        click.echo(_table(rows, layout))


def _label(project: dict[str, Any]) -> str:
    return f"{project['name']!r} ({project['id']})"


@click.group(cls=ManageGroup, epilog=EXIT_CODES_HELP)
@_common_options
@click.pass_context
def manage(ctx: click.Context, /, **options: Any) -> None:
    """Manage projects and tokens through the management API.

    On the server's machine no option is needed: the server is reached at its LISTEN_ADDR and the
    management token is read from its DATA_DIR. Ids may be shortened to any unique prefix of at
    least 4 characters, as the lists show them.
    """
    ctx.obj = _options(ctx, options)


@manage.group()
def project() -> None:
    """Projects hold the real upstream key."""


PROJECT_ID_HELP = "The project's id, or a unique prefix of it (at least 4 characters)."
TOKEN_ID_HELP = "The token's id, or a unique prefix of it (at least 4 characters)."
WIDE_HELP = "Every field, with whole ids (wider than 80 columns)."


def _api_key(ctx: click.Context, given: str | None) -> str:
    """``--api-key`` as given, from stdin for ``-``, or asked for on a terminal when left out."""
    if given is not None:
        return secret_option_value(given, "--api-key", "Upstream API key")
    if sys.stdin.isatty():
        return ask_secret("Upstream API key")
    option = next(p for p in ctx.command.params if p.name == "api_key")
    raise click.MissingParameter("Give it, or - to read it from stdin.", ctx=ctx, param=option)


@project.command("create", epilog=EXIT_CODES_HELP)
@click.option("--name", required=True, help="A name for people; need not be unique.")
@click.option(
    "--api-key",
    default=None,
    help="The real upstream key; stored encrypted. - reads it from stdin; left out, it is asked"
    f" for on a terminal (hidden). {ON_THE_COMMAND_LINE}",
)
@click.option("--description", default=None, help="Free text shown with the project.")
@click.option("--metadata", default=None, help='A JSON object, e.g. \'{"team": "search"}\'.')
@_common_options
@click.pass_context
def project_create(
    ctx: click.Context,
    /,
    name: str,
    api_key: str | None,
    description: str | None,
    metadata: str | None,
    **o: Any,
) -> None:
    """Create a project."""
    opts = _options(ctx, o)
    body: dict[str, Any] = {"name": name, "api_key": _api_key(ctx, api_key)}
    if description is not None:
        body["description"] = description
    if metadata is not None:
        body["metadata"] = _json_object(metadata, "--metadata")
    _emit(opts, _call(opts, "POST", "/manage/projects", body, answer=PROJECT))


@project.command("list", epilog=EXIT_CODES_HELP)
@click.option("--wide", is_flag=True, help=WIDE_HELP)
@_common_options
@click.pass_context
def project_list(ctx: click.Context, /, wide: bool, **o: Any) -> None:
    """List projects: short ids, name, status, masked key, creation time (UTC)."""
    opts = _options(ctx, o)
    layout: Layout = _wide_columns(PROJECT_FIELDS) if wide else _project_columns
    _emit_list(
        opts, _call(opts, "GET", "/manage/projects", answer=PROJECT, many=True), layout, "projects"
    )


@project.command("get", epilog=EXIT_CODES_HELP)
@click.argument("project_id", help=PROJECT_ID_HELP)
@_common_options
@click.pass_context
def project_get(ctx: click.Context, /, project_id: str, **o: Any) -> None:
    """Show one project."""
    opts = _options(ctx, o)
    _emit(opts, _get(opts, PROJECTS, project_id))


@project.command("update", epilog=EXIT_CODES_HELP)
@click.argument("project_id", help=PROJECT_ID_HELP)
@click.option("--name", default=None, help="A new name.")
@click.option(
    "--api-key",
    default=None,
    help=f"A new upstream key; stored encrypted. - reads it from stdin. {ON_THE_COMMAND_LINE}",
)
@click.option("--description", default=None, help="A new description.")
@click.option("--active/--inactive", "is_active", default=None, help="Activate or deactivate.")
@click.option(
    "--revoke-tokens", is_flag=True, default=False, help="Also revoke all its tokens (asks first)."
)
@_yes_option
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
    yes: bool,
    **o: Any,
) -> None:
    """Change a project's name, key, description or state."""
    opts = _options(ctx, o)
    body: dict[str, Any] = {
        k: v
        for k, v in {
            "name": name,
            "api_key": None if api_key is None else _api_key(ctx, api_key),
            "description": description,
            "is_active": is_active,
        }.items()
        if v is not None
    }
    if revoke_tokens:
        body["revoke_tokens"] = True
    if not body:
        raise click.UsageError("nothing to update: give at least one option")
    if revoke_tokens and _needs_asking(yes):
        found = _get(opts, PROJECTS, project_id)
        _confirm(f"Revoke every token of project {_label(found)}?")
        project_id = found["id"]
    _emit(
        opts,
        _with_id(
            opts,
            PROJECTS,
            project_id,
            lambda i: _call(opts, "PATCH", f"/manage/projects/{_quote(i)}", body, answer=PROJECT),
        ),
    )


@project.command("delete", epilog=EXIT_CODES_HELP)
@click.argument("project_id", help=PROJECT_ID_HELP)
@_yes_option
@_common_options
@click.pass_context
def project_delete(ctx: click.Context, /, project_id: str, yes: bool, **o: Any) -> None:
    """Delete a project; its tokens stop working at once. Asks first on a terminal."""
    opts = _options(ctx, o)
    ask = _needs_asking(yes)
    found = _get(opts, PROJECTS, project_id)
    if ask:
        _confirm(f"Delete project {_label(found)}? Its tokens stop working at once.")
    _call(opts, "DELETE", f"/manage/projects/{_quote(found['id'])}")
    if opts.as_json:
        click.echo(json.dumps({"deleted": found["id"]}))
    else:
        click.echo(f"Deleted project {found['id']}.")


@manage.group()
def token() -> None:
    """Withering tokens: short-lived, revocable, with optional limits."""


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


@token.command("generate", epilog=EXIT_CODES_HELP)
@click.option("--project-id", required=True, help=PROJECT_ID_HELP)
@click.option(
    "--duration",
    # Also under the API's own name for it, which an operator who knows the API types.
    "--duration-minutes",
    "duration_minutes",
    type=int,
    default=60,
    help="Lifetime in minutes (1..525600).",
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
        "duration_minutes": duration_minutes,
        **_limits_body(max_requests, rpm, tpm, budget_usd, allowed_models),
    }
    if metadata is not None:
        body["metadata"] = _json_object(metadata, "--metadata")
    issued = _with_id(
        opts,
        PROJECTS,
        project_id,
        lambda i: _call(opts, "POST", "/manage/tokens", {"project_id": i, **body}, answer=ISSUED),
    )
    _emit(opts, issued)


@token.command("list", epilog=EXIT_CODES_HELP)
@click.option("--project-id", default=None, help=f"Only this project's tokens. {PROJECT_ID_HELP}")
@click.option("--wide", is_flag=True, help=WIDE_HELP)
@_common_options
@click.pass_context
def token_list(ctx: click.Context, /, project_id: str | None, wide: bool, **o: Any) -> None:
    """List tokens (never their values): short ids, status (active, expired, revoked or
    exhausted), expiry (UTC), requests and spend, each of its limit when it has one."""
    opts = _options(ctx, o)
    if project_id is None:
        rows = _call(opts, "GET", "/manage/tokens", answer=TOKEN, many=True)
    else:
        rows = _with_id(
            opts,
            PROJECTS,
            project_id,
            lambda i: _call(
                opts, "GET", f"/manage/tokens?project_id={_quote(i)}", answer=TOKEN, many=True
            ),
        )
    layout: Layout = _wide_columns(TOKEN_FIELDS) if wide else _token_columns
    _emit_list(opts, rows, layout, "tokens")


@token.command("get", epilog=EXIT_CODES_HELP)
@click.argument("token_id", help=TOKEN_ID_HELP)
@_common_options
@click.pass_context
def token_get(ctx: click.Context, /, token_id: str, **o: Any) -> None:
    """Show one token."""
    opts = _options(ctx, o)
    _emit(opts, _get(opts, TOKENS, token_id))


@token.command("revoke", epilog=EXIT_CODES_HELP)
@click.argument("token_id", required=False, help=TOKEN_ID_HELP)
@click.option(
    "--value",
    default=None,
    help="Revoke by the token value instead of its id; - reads it from stdin."
    f" {ON_THE_COMMAND_LINE}",
)
@click.option(
    "--project-id", default=None, help=f"Revoke every token of this project. {PROJECT_ID_HELP}"
)
@_yes_option
@_common_options
@click.pass_context
def token_revoke(
    ctx: click.Context,
    /,
    token_id: str | None,
    value: str | None,
    project_id: str | None,
    yes: bool,
    **o: Any,
) -> None:
    """Revoke a token by id, by value, or all tokens of a project. Asks first on a terminal."""
    opts = _options(ctx, o)
    if sum(x is not None for x in (token_id, value, project_id)) != 1:
        raise click.UsageError("give exactly one of TOKEN_ID, --value or --project-id")
    if project_id is not None:
        ask = _needs_asking(yes)
        found = _get(opts, PROJECTS, project_id)
        if ask:
            _confirm(f"Revoke every token of project {_label(found)}?")
        path = f"/manage/projects/{_quote(found['id'])}/tokens/revoke"
        _emit(opts, _call(opts, "POST", path, answer=REVOKED))
        return
    ask = _needs_asking(yes)
    if value is not None:
        value = secret_option_value(value, "--value", "Token value")
        if ask:
            _confirm("Revoke the token with this value?")
        _call(opts, "DELETE", "/manage/tokens", {"token": value})
        revoked: str | bool = True
        target = "the token"
    else:
        found = _get(opts, TOKENS, token_id or "")
        if ask:
            _confirm(
                f"Revoke token {found['id']} ({found['status']}, project {found['project_id']})?"
            )
        _call(opts, "DELETE", f"/manage/tokens/{_quote(found['id'])}")
        revoked = found["id"]
        target = f"token {found['id']}"
    if opts.as_json:
        click.echo(json.dumps({"revoked": revoked}))
    else:
        click.echo(f"Revoked {target}.")


@token.command("update", epilog=EXIT_CODES_HELP)
@click.argument("token_id", help=TOKEN_ID_HELP)
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
    _emit(
        opts,
        _with_id(
            opts,
            TOKENS,
            token_id,
            lambda i: _call(opts, "PATCH", f"/manage/tokens/{_quote(i)}", body, answer=TOKEN),
        ),
    )
