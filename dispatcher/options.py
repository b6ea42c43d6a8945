"""What the ``llm-proxy dispatcher`` commands share: the backend built from its options, the
options themselves, and Redis URLs shown without their password."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import click
from redis.exceptions import AuthenticationError

from dispatcher.backends import Backend
from dispatcher.backends import helicone as helicone_backend
from dispatcher.backends import lunary as lunary_backend
from dispatcher.backends.file import FileBackend
from llm_proxy.events.redis import url_options_problem

SERVICES = ("file", "helicone", "cloudwatch", "lunary")
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_STREAM = "llm-proxy:events"
# What to fix when a backend refuses the credentials (401/403, an AWS authentication error).
CREDENTIALS = {
    "helicone": "--helicone-api-key / HELICONE_API_KEY",
    "lunary": "--lunary-public-key / LUNARY_PUBLIC_KEY",
    "cloudwatch": "the AWS credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profile or "
    "role) or their logs:PutLogEvents permission (and CreateLogGroup, CreateLogStream unless "
    "the group and stream exist)",
}

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class BackendOptions:
    path: Path | None
    max_bytes: int
    backups: int
    helicone_url: str
    helicone_api_key: str | None = field(repr=False)
    log_group: str
    log_stream: str
    region: str | None
    endpoint_url: str | None
    lunary_url: str
    lunary_public_key: str | None = field(repr=False)


def credentials(service: str) -> str:
    return CREDENTIALS.get(service, f"the {service} credentials")


# A key goes out in a header, where a CR or LF would end it: the request fails before it is sent.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _required(value: str | None, option: str, service: str) -> str:
    if not value:
        raise click.UsageError(f"--service {service} needs {option}")
    if _CONTROL.search(value):
        # Never the value: it is a key.
        raise click.UsageError(
            f"{option} holds a control character (a trailing newline?): remove it"
        )
    return value


def build_backend(service: str, options: BackendOptions, data_dir: Path) -> Backend:
    if service == "file":
        return FileBackend(
            options.path or data_dir / "events.jsonl",
            max_bytes=options.max_bytes,
            backups=options.backups,
        )
    if service == "helicone":
        key = _required(options.helicone_api_key, "--helicone-api-key / HELICONE_API_KEY", service)
        return helicone_backend.HeliconeBackend(key, url=options.helicone_url)
    if service == "cloudwatch":
        # aiobotocore comes with the "cloudwatch" extra; the default install does without it.
        try:
            from dispatcher.backends.cloudwatch import CloudWatchBackend, configured_region
        except ImportError:
            raise click.UsageError(
                "the cloudwatch service needs the cloudwatch extra: pip install 'llm-proxy[cloudwatch]'"
            ) from None
        region = options.region or configured_region()
        return CloudWatchBackend(
            options.log_group,
            options.log_stream,
            region=_required(
                region, "--region / AWS_REGION (or AWS_DEFAULT_REGION, or a profile's)", service
            ),
            endpoint_url=options.endpoint_url,
        )
    key = _required(options.lunary_public_key, "--lunary-public-key / LUNARY_PUBLIC_KEY", service)
    return lunary_backend.LunaryBackend(key, url=options.lunary_url)


def redis_location(url: str) -> str:
    """Where a Redis URL points, for messages: host:port or the socket path, never a password."""
    try:
        parts = urlsplit(url)
    except ValueError:  # an IPv6 address with a bracket missing, or not an address
        raise click.BadParameter(
            "is not a valid URL: an IPv6 address goes whole in brackets, as [::1]:6379",
            param_hint="--redis-url / REDIS_URL",
        ) from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise click.BadParameter(
            "must start with redis://, rediss:// or unix://", param_hint="--redis-url / REDIS_URL"
        )
    try:
        port = parts.port or 6379
    except ValueError:
        raise click.BadParameter("has a bad port", param_hint="--redis-url / REDIS_URL") from None
    problem = url_options_problem(url)
    if problem is not None:
        raise click.BadParameter(problem, param_hint="--redis-url / REDIS_URL")
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname or 'localhost'}:{port}"


def redis_problem(exc: BaseException, url: str) -> str:
    """Why Redis at ``url`` could not be used, without the password ``url`` may hold."""
    where = redis_location(url)
    if isinstance(exc, AuthenticationError):
        text = f"Redis at {where} refused the credentials in --redis-url / REDIS_URL: {exc}"
    else:
        text = f"Redis unreachable at {where}: {str(exc) or type(exc).__name__}"
    password = urlsplit(url).password
    for secret in {password, unquote(password)} if password else ():
        text = text.replace(secret, "***")
    return text


# -- options shared by the worker and replay ---------------------------------------------------

DATA_DIR = click.option(
    "--data-dir",
    envvar="DATA_DIR",
    show_envvar=True,
    type=click.Path(path_type=Path),
    default=Path("data"),
    show_default=True,
    help="Where the default event log and dead-letter files live.",
)

_BACKEND_OPTIONS = [
    click.option(
        "--path",
        envvar="LLM_PROXY_EVENT_LOG",
        show_envvar=True,
        type=click.Path(path_type=Path),
        help="file: the JSONL file. [default: DATA_DIR/events.jsonl]",
    ),
    click.option(
        "--max-bytes",
        type=click.IntRange(1),
        default=100 * 1024 * 1024,
        show_default=True,
        help="file: rotate beyond this size, in bytes.",
    ),
    click.option(
        "--backups",
        type=click.IntRange(0),
        default=5,
        show_default=True,
        help="file: rotated files kept.",
    ),
    click.option(
        "--helicone-url",
        envvar="HELICONE_URL",
        show_envvar=True,
        default=helicone_backend.DEFAULT_URL,
        show_default=True,
        help="helicone: the async (custom) logging endpoint.",
    ),
    click.option(
        "--helicone-api-key",
        envvar="HELICONE_API_KEY",
        show_envvar=True,
        help="helicone: API key. Prefer the environment variable: options show in `ps`.",
    ),
    click.option(
        "--log-group",
        envvar="CLOUDWATCH_LOG_GROUP",
        show_envvar=True,
        default="llm-proxy",
        show_default=True,
        help="cloudwatch: log group, created if missing.",
    ),
    click.option(
        "--log-stream",
        envvar="CLOUDWATCH_LOG_STREAM",
        show_envvar=True,
        default="events",
        show_default=True,
        help="cloudwatch: log stream, created if missing.",
    ),
    click.option(
        "--region",
        envvar="AWS_REGION",
        show_envvar=True,
        help="cloudwatch: AWS region. [default: AWS_DEFAULT_REGION, else the profile's region] "
        "Credentials come from the usual AWS chain "
        "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profile, instance role).",
    ),
    click.option(
        "--endpoint-url",
        envvar="AWS_ENDPOINT_URL",
        show_envvar=True,
        help="cloudwatch: endpoint override (a VPC endpoint, a local emulator).",
    ),
    click.option(
        "--lunary-url",
        envvar="LUNARY_API_URL",
        show_envvar=True,
        default=lunary_backend.DEFAULT_URL,
        show_default=True,
        help="lunary: API base URL (self-hosted Lunary: your own).",
    ),
    click.option(
        "--lunary-public-key",
        envvar="LUNARY_PUBLIC_KEY",
        show_envvar=True,
        help="lunary: project public key. Prefer the environment variable: options show in `ps`.",
    ),
]


def backend_options(command: F) -> F:
    for option in reversed(_BACKEND_OPTIONS):
        command = option(command)
    return command


def _stream_name(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    # A blank name is a stream no server publishes on (they refuse it): nothing would arrive.
    if not value.strip():
        raise click.BadParameter("must name a Redis stream, such as llm-proxy:events")
    return value


def redis_options(command: F) -> F:
    command = click.option(
        "--stream",
        envvar="LLM_PROXY_EVENT_STREAM",
        show_envvar=True,
        default=DEFAULT_STREAM,
        show_default=True,
        callback=_stream_name,
        help="Redis Stream the proxies publish events on (the servers read the same variable).",
    )(command)
    return click.option(
        "--redis-url",
        envvar="REDIS_URL",
        show_envvar=True,
        default=DEFAULT_REDIS_URL,
        show_default=True,
        help="Redis holding the event stream (a password in it is never printed).",
    )(command)
