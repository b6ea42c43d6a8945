"""Frozen settings, built once in the CLI layer from flags and environment variables.

Nothing else in the package reads ``os.environ``. A bad value raises :class:`SettingsError`, whose
message is a single line naming the variable, so start-up can stop with exactly that line.
"""

from __future__ import annotations

import base64
import os
import re
import ssl
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal
from urllib.parse import SplitResult, unquote, urlsplit

from llm_proxy import listen_addr
from llm_proxy.client_address import TRUST_NO_ONE, ForwardedTrust
from llm_proxy.events.redis import url_options_problem
from llm_proxy.http.egress import Egress, NoProxy, parse_proxy_url
from llm_proxy.pricing import PriceFile
from llm_proxy.proxy.budget_ledger import HOLD_LEASE_SECONDS
from llm_proxy.store.opening import sqlite_path
from llm_proxy.store.postgres_url import split_connect_timeout, ssl_as_sslmode

# "none" emits no events at all: for benchmarks that measure what publishing costs.
EventBusKind = Literal["memory", "redis", "none"]
LogFormat = Literal["console", "json"]
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DEFAULT_PRICES_PATH = Path("config/prices.yaml")
DEFAULT_USAGE_HOURLY_RETENTION_DAYS = 90
MAX_RETENTION_DAYS = 36500
DEFAULT_EXPIRED_TOKEN_RETENTION_DAYS = 90
# Far beyond any machine's cores (each worker brings its events process): a larger count is a
# typo, and the supervisor would build a slot for each before forking the first.
MAX_WORKERS = 1024
# Beyond what a PostgreSQL server admits (max_connections is 100 unless raised): a larger size is
# a typo, and asyncpg makes a slot for each connection the pool may open before it opens one.
MAX_DATABASE_POOL_SIZE = 1000


class SettingsError(ValueError):
    """A configuration value is unusable; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    management_token: str = field(default="", repr=False)
    admin_user: str = "admin"
    admin_password: str = field(default="", repr=False)
    database_url: str = "sqlite:///./data/llm-proxy.db"
    encryption_key: bytes = field(default=b"", repr=False)
    # Whether start-up stops when ENCRYPTION_KEY opens none of the stored upstream keys. Off only
    # to start after the key was lost, and set every project's key anew.
    encryption_key_check: bool = True
    api_config_path: Path = Path("config/api_providers.yaml")
    # PRICES_PATH; None when not set: config/prices.yaml if it exists (see price_file).
    prices_path: Path | None = None
    event_bus: EventBusKind = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # EVENTS_STREAM_MAX_LENGTH: the Redis stream's hard cap, beyond which entries are trimmed even
    # if a consumer group has not delivered them (counted as dropped).
    events_stream_max_length: int = 100_000
    # LLM_PROXY_EVENT_STREAM: the Redis stream events are published on, which the dispatchers read
    # (they take the same variable).
    events_stream: str = "llm-proxy:events"
    # EVENTS_SPOOL_MAX_BYTES: events a process spools under DATA_DIR while Redis is away; beyond
    # it they are dropped (counted), or an outage would fill the disk the database may share.
    events_spool_max_bytes: int = 1024**3
    # EVENTS_FILE_GROUP_IDLE: a --file-event-log consumer group no one has read for this long is
    # an instance's that is gone (a replaced container has a new host name) and is deleted.
    events_file_group_idle: float = 3600.0
    log_level: str = "info"
    log_format: LogFormat = "json"
    data_dir: Path = Path("data")
    file_event_log: Path | None = None
    workers: int = 1
    worker_index: int = 0  # this process's slot under --workers (set by the supervisor's worker)
    max_request_body_bytes: int = 64 * 1024 * 1024
    capture_body_bytes: int = 256 * 1024
    # Connections each process keeps to PostgreSQL (the LISTEN connection comes on top).
    database_pool_size: int = 10
    token_cache_seconds: float = 30.0
    # How often the change feed is read: while no push channel is up, and while one is (a
    # channel can die without a sign for a while: the timer alone must then keep the second).
    change_poll_seconds: float = 0.25
    change_poll_seconds_pushed: float = 0.5
    # A token cache whose change feed has not been read for this long is not trusted: every
    # request is checked against the database until the feed answers again (fail closed).
    revocation_max_staleness: float = 5.0
    # Wake-ups pushed by the database (PostgreSQL LISTEN). Off behind a pooler that cannot carry
    # LISTEN (PgBouncer in transaction mode): the polled feed alone then keeps caches fresh.
    change_push: bool = True
    usage_flush_seconds: float = 1.0
    # How long a budget hold lasts unless the process serving its request renews it (see
    # proxy/budget_ledger.py); shorter in tests, which wait for a dead process's holds to lapse.
    budget_hold_lease_seconds: float = HOLD_LEASE_SECONDS
    # USAGE_HOURLY_RETENTION_DAYS: hourly usage aggregates older than this are deleted (the admin
    # charts show 30 days; the all-time totals then count only what is kept); 0 keeps them all.
    usage_hourly_retention_days: int = DEFAULT_USAGE_HOURLY_RETENTION_DAYS
    # EXPIRED_TOKEN_RETENTION_DAYS: tokens expired longer ago than this are deleted (see
    # store/retention.py); 0 keeps them all.
    expired_token_retention_days: int = DEFAULT_EXPIRED_TOKEN_RETENTION_DAYS
    # AUDIT_RETENTION_DAYS: audit events older than this are deleted; 0 (the default) keeps them
    # all, as an audit trail's lifetime is the operator's policy.
    audit_retention_days: int = 0
    # How long a client may take: to send a request head, between body bytes (and between
    # reads of a response), and idle between requests on a kept-alive connection.
    client_header_timeout: float = 30.0
    client_body_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    # After SIGTERM, how long the requests in flight (streams above all) may take to finish before
    # the server cuts them; their events and usage are written after it, so the platform's own
    # grace (terminationGracePeriodSeconds, stop_grace_period) must cover both.
    graceful_shutdown_timeout: float = 10.0
    # The longest the event loop keeps polling after socket activity (0: never); see busy_poll.py.
    busy_poll_micros: int = 0
    # Where events are built, published and aggregated: in the events process beside the server
    # (llm_proxy/runtime/events_process.py), keeping that work off the server's GIL; tests use "thread"
    # to run the same pipeline inside the application.
    event_build_in: Literal["process", "thread"] = "process"
    # Bytes of finished exchanges a server process lets wait for its events process: from half of
    # it on, request bodies are left out of events; beyond it, exchanges nothing settles are dropped.
    events_backlog_bytes: int = 64 * 1024 * 1024
    # Upstream connections through an HTTP CONNECT proxy; the URLs may carry a password.
    https_proxy: str | None = field(default=None, repr=False)
    http_proxy: str | None = field(default=None, repr=False)
    no_proxy: str | None = None
    # CA certificates upstream TLS trusts besides the system store (OpenSSL reads the variables).
    ssl_cert_file: str | None = None
    ssl_cert_dir: str | None = None
    # FORWARDED_ALLOW_IPS: the reverse proxies whose X-Forwarded-For names the client in audit
    # entries and sign-in warnings; none by default, so no client can write its own address.
    forwarded_allow_ips: ForwardedTrust = TRUST_NO_ONE

    def __repr__(self) -> str:
        """Every setting but the secrets; the URLs with their passwords masked."""
        shown = []
        for setting in fields(self):
            value = getattr(self, setting.name)
            if setting.name in _URLS_WITH_PASSWORDS:
                shown.append(f"{setting.name}={value and masked_url(value)!r}")
            elif setting.repr:
                shown.append(f"{setting.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    @property
    def log_secrets(self) -> tuple[str, ...]:
        """What the logs must never show, whatever line would carry it: the secrets this
        process was configured with (the encryption key as it is written) and the passwords
        in its URLs."""
        secrets = [self.management_token, self.admin_password]
        if self.encryption_key:
            for encode in (base64.b64encode, base64.urlsafe_b64encode):
                written = encode(self.encryption_key).decode()
                secrets += [written, written.rstrip("=")]
        for name in _URLS_WITH_PASSWORDS:
            secrets += url_passwords(getattr(self, name) or "")
        return tuple(dict.fromkeys(secret for secret in secrets if secret))

    def export_trust_paths(self) -> None:
        """Put the trust paths given as flags where OpenSSL reads them, for this process and
        the ones it starts."""
        if self.ssl_cert_file:
            os.environ["SSL_CERT_FILE"] = self.ssl_cert_file
        if self.ssl_cert_dir:
            os.environ["SSL_CERT_DIR"] = self.ssl_cert_dir

    @property
    def egress(self) -> Egress | None:
        """How upstream connections leave: through proxies, or None for directly."""
        return Egress.from_values(self.https_proxy, self.http_proxy, self.no_proxy)

    @property
    def price_file(self) -> PriceFile:
        """Where model prices are read from. Left unset, PRICES_PATH may name no file: a config
        directory of the operator's own mounted over the image's may hold no prices."""
        if self.prices_path is None:
            return PriceFile(DEFAULT_PRICES_PATH, optional=True)
        return PriceFile(self.prices_path)

    @property
    def sqlite_path(self) -> Path:
        """The database file for a ``sqlite://`` URL (SQLAlchemy convention: 3 slashes relative)."""
        return sqlite_path_from_url(self.database_url)

    @property
    def database_label(self) -> str:
        """The database, named for logs: the file, or the server and database without credentials."""
        return database_label(self.database_url)


_URLS_WITH_PASSWORDS = frozenset({"database_url", "redis_url", "https_proxy", "http_proxy"})
# scheme://user:password@ (up to the last "@", as urllib reads it), and a password= parameter.
_URL_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/?#:@]*:)([^/?#]*)@")
_QUERY_PASSWORD = re.compile(r"([?&]password=)([^&#]*)", re.IGNORECASE)


def url_passwords(url: str) -> list[str]:
    """The password of ``url`` (and of a password= parameter), as written and decoded."""
    found = [match.group(2) for match in _URL_PASSWORD.finditer(url)]
    found += [match.group(2) for match in _QUERY_PASSWORD.finditer(url)]
    return [spelling for password in found for spelling in (password, unquote(password))]


def masked_url(url: str) -> str:
    """``url`` with its password, if any, as ``***``: the rest stays, for debugging."""
    return _QUERY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", url))


def parse_listen_addr(value: str) -> tuple[str, int]:
    """``host:port``, ``:port`` (every interface) or ``[IPv6]:port``."""
    try:
        return listen_addr.parse_listen_addr(value)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def sqlite_path_from_url(url: str) -> Path:
    try:
        return sqlite_path(url)
    except ValueError as exc:
        raise SettingsError(f"DATABASE_URL: {exc}") from None


# SQLAlchemy's spellings included (postgresql+<driver>): the driver named is the copied
# application's; this one always connects with asyncpg.
_POSTGRES_SCHEMES = (
    "postgresql",
    "postgres",
    "postgresql+asyncpg",
    "postgresql+psycopg",
    "postgresql+psycopg2",
)


_PERCENT_ENCODE = "percent-encode @ : / ? # in a user name or password (%40 %3A %2F %3F %23)"


def _split_url(name: str, url: str) -> SplitResult:
    try:
        return urlsplit(url)
    except ValueError:  # urllib's only complaint: an IPv6 address with a bracket missing, or bad
        raise SettingsError(
            f"{name}: not a valid URL: an IPv6 address goes whole in brackets, as [::1]:5432"
        ) from None


def check_database_url(url: str) -> str:
    """A usable ``sqlite:///`` or ``postgresql://`` URL; PostgreSQL spellings become the latter.

    The error never repeats the URL: it may carry a password.
    """
    parts = _split_url("DATABASE_URL", url)
    if parts.scheme == "sqlite":
        if str(sqlite_path_from_url(url)) == ":memory:":
            # Each process (every worker, the events process) would open a database of its own,
            # empty: what one writes, no other reads.
            raise SettingsError(
                "DATABASE_URL: an in-memory SQLite database (:memory:) is not supported: the"
                " server's processes must share one; give a file, such as sqlite:///data/llm-proxy.db"
            )
        return url
    if parts.scheme in _POSTGRES_SCHEMES:
        if not url[len(parts.scheme) :].startswith("://"):
            # Not a URL the store opens as PostgreSQL's, and the rest may hold a password.
            raise SettingsError(
                "DATABASE_URL: expected postgresql://user:password@host:port/database"
            )
        if parts.netloc.count("@") > 1:
            # urllib splits the credentials from the host at the last "@" and asyncpg at the
            # first: it would take part of the password for the host and port, and put it in
            # its error.
            raise SettingsError(
                f"DATABASE_URL: an '@' in the user name or password must be written %40;"
                f" {_PERCENT_ENCODE}"
            )
        for host in _postgres_hosts(parts):
            _check_port("DATABASE_URL", "the PostgreSQL port", host)
        if not parts.path.strip("/") and "dbname=" not in parts.query:
            raise SettingsError("DATABASE_URL: the PostgreSQL URL names no database")
        try:
            split_connect_timeout(url)
            return "postgresql" + ssl_as_sslmode(url)[len(parts.scheme) :]
        except ValueError as exc:
            raise SettingsError(f"DATABASE_URL: {exc}") from None
    raise SettingsError(
        f"DATABASE_URL: unsupported scheme {parts.scheme or '(none)'!r};"
        " use sqlite:/// or postgresql://"
    )


def _postgres_hosts(parts: SplitResult) -> list[SplitResult]:
    """Each ``host[:port]`` of the URL: libpq and asyncpg take several, comma-separated, and
    connect to the first that answers."""
    hosts = parts.netloc.rpartition("@")[2]
    return [_split_url("DATABASE_URL", f"//{host}") for host in hosts.split(",")]


def database_label(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        return str(sqlite_path_from_url(url))
    hosts = [
        f"{host.hostname or 'localhost'}{f':{host.port}' if host.port else ''}"
        for host in _postgres_hosts(parts)
    ]
    return f"{parts.scheme}://{','.join(hosts)}{parts.path}"


# Base64 of 32 bytes is 43 characters and one "=" of padding, in the standard alphabet or the
# URL-safe one (Fernet.generate_key() and secrets.token_urlsafe(32) write that), padded or not.
_ENCRYPTION_KEY_SPELLINGS = re.compile(r"[A-Za-z0-9+/]{43}=?|[A-Za-z0-9_-]{43}=?")
_URL_SAFE_ALPHABET = str.maketrans("-_", "+/")


def parse_encryption_key(value: str) -> bytes:
    """Base64 of 32 bytes, without the whitespace around it (a key written to a file, and the
    Secret mounted from it, ends in a newline)."""
    written = value.strip()
    if not _ENCRYPTION_KEY_SPELLINGS.fullmatch(written):
        raise SettingsError("ENCRYPTION_KEY: expected base64 of exactly 32 bytes")
    return base64.b64decode(written.rstrip("=").translate(_URL_SAFE_ALPHABET) + "=")


def check_redis_url(value: str) -> str:
    """A ``redis://``, ``rediss://`` or ``unix://`` URL redis-py can read (it splits the
    credentials at the last "@", as urllib does); the error never repeats it."""
    parts = _split_url("REDIS_URL", value)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise SettingsError("REDIS_URL: expected a redis://, rediss:// or unix:// URL")
    _check_port("REDIS_URL", "the port", parts)
    problem = url_options_problem(value)
    if problem is not None:
        raise SettingsError(f"REDIS_URL: {problem}")
    return value


def _check_port(variable: str, what: str, parts: SplitResult) -> None:
    try:
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        raise SettingsError(
            f"{variable}: {what} is not a number (if a password holds one of them,"
            f" {_PERCENT_ENCODE})"
        ) from None


def check_stream_name(value: str) -> str:
    if not value.strip():
        raise SettingsError(
            "LLM_PROXY_EVENT_STREAM: must name a Redis stream, such as llm-proxy:events"
        )
    return value


def check_proxy_url(name: str, value: str | None) -> str | None:
    """A proxy URL, validated; the error never repeats it (it may carry a password)."""
    if not value:
        return None
    try:
        parse_proxy_url(value)
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None
    return value


def check_trust_path(name: str, value: str | None, *, directory: bool) -> str | None:
    """``SSL_CERT_FILE`` (a file) or ``SSL_CERT_DIR`` (a directory), when set."""
    if not value:
        return None
    if not (os.path.isdir(value) if directory else os.path.isfile(value)):
        raise SettingsError(f"{name}: {value} is not a {'directory' if directory else 'file'}")
    if not directory:
        # OpenSSL skips a file it cannot read as certificates without a word: the CA meant to be
        # trusted would not be, and every request to an upstream it signed would fail.
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=value)
        except ssl.SSLError:
            raise SettingsError(f"{name}: {value} holds no PEM certificate") from None
        except OSError as exc:
            raise SettingsError(f"{name}: cannot read {value}: {exc.strerror}") from None
    return value


def check_no_proxy(value: str | None) -> str | None:
    if not value:
        return None
    try:
        NoProxy(value)
    except ValueError as exc:
        raise SettingsError(f"NO_PROXY: {exc}") from None
    return value


def check_log_level(value: str) -> str:
    level = value.lower()
    if level not in LOG_LEVELS:
        raise SettingsError(f"LOG_LEVEL: expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return level


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise SettingsError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def parse_forwarded_allow_ips(value: str) -> ForwardedTrust:
    try:
        return ForwardedTrust.parse(value)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def parse_whole_number(name: str, value: int | str, *, at_most: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise SettingsError(f"{name}: expected a whole number, got {value!r}") from None
    if not 0 <= number <= at_most:
        raise SettingsError(f"{name}: must be between 0 and {at_most}")
    return number


def parse_retention_days(name: str, value: int | str) -> int:
    """A ``*_RETENTION_DAYS`` setting: whole days, 0 for keeping everything."""
    return parse_whole_number(name, value, at_most=MAX_RETENTION_DAYS)


def parse_positive_int(name: str, value: int | str, *, at_most: int | None = None) -> int:
    try:
        number = int(value)
    except ValueError:
        raise SettingsError(f"{name}: expected a whole number, got {value!r}") from None
    if at_most is not None and not 1 <= number <= at_most:
        raise SettingsError(f"{name}: must be between 1 and {at_most}")
    if number < 1:
        raise SettingsError(f"{name}: must be at least 1")
    return number


_SECONDS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")


def parse_seconds(name: str, value: str) -> float:
    """``30s``, ``500ms``, ``2m``, ``45`` → seconds (positive)."""
    match = _SECONDS.match(value)
    if not match or float(match.group(1)) <= 0:
        raise SettingsError(f"{name}: expected a duration such as 30s, got {value!r}")
    return float(match.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[match.group(2) or "s"]


_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)


def parse_size(name: str, value: str) -> int:
    """``64MiB``, ``512k``, ``1048576`` → bytes."""
    match = _SIZE.match(value)
    if not match:
        raise SettingsError(f"{name}: expected a size such as 64MiB, got {value!r}")
    number, unit = int(match.group(1)), (match.group(2) or "b").lower()
    scale = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit[0]]
    if number * scale <= 0:
        raise SettingsError(f"{name}: must be positive")
    return number * scale
