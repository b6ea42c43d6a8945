"""``llm-proxy``: one console script, several commands. CLI → settings → server, in one direction."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from dispatcher.cli import dispatcher_command
from llm_proxy import __version__
from llm_proxy.control.manage_cli import manage
from llm_proxy.pricing import PricesError
from llm_proxy.private_files import owner_only_files
from llm_proxy.proxy.api_config import ApiConfigError, load_api_config
from llm_proxy.runtime.healthcheck import healthcheck_command, listen_addr_option
from llm_proxy.runtime.logging_setup import configure_logging
from llm_proxy.runtime.required_settings import check_required_settings, required_settings_option
from llm_proxy.runtime.settings import (
    MAX_DATABASE_POOL_SIZE,
    MAX_WORKERS,
    Settings,
    SettingsError,
    check_choice,
    check_database_url,
    check_log_level,
    check_no_proxy,
    check_proxy_url,
    check_redis_url,
    check_stream_name,
    check_trust_path,
    parse_encryption_key,
    parse_forwarded_allow_ips,
    parse_listen_addr,
    parse_positive_int,
    parse_retention_days,
    parse_seconds,
    parse_size,
    parse_whole_number,
)
from llm_proxy.secret_input import configured_password, configured_token
from llm_proxy.store.opening import default_database_url
from llm_proxy.tools.benchmark.command import benchmark_command
from llm_proxy.tools.mock_upstream import mock_upstream_command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="llm-proxy")
@click.pass_context
def main(context: click.Context) -> None:
    """A low-latency OpenAI gateway issuing withering tokens."""
    if context.invoked_subcommand == "dispatcher":
        # The dispatcher cannot reach runtime's logging set-up (the layers forbid it): its logs
        # follow LOG_LEVEL and LOG_FORMAT, secrets masked, as the server's do.
        try:
            level = check_log_level(os.environ.get("LOG_LEVEL", "info"))
            fmt = check_choice(
                "LOG_FORMAT",
                os.environ.get("LOG_FORMAT") or ("console" if sys.stderr.isatty() else "json"),
                ("console", "json"),
            )
        except SettingsError as exc:
            click.echo(f"llm-proxy: {exc}", err=True)
            sys.exit(2)
        configure_logging(level, fmt)


def build_settings(
    *,
    listen_addr: str,
    management_token: str | None,
    admin_user: str,
    admin_password: str | None,
    database_url: str | None,
    encryption_key: str | None,
    api_config_path: str,
    event_bus: str,
    redis_url: str,
    log_level: str,
    log_format: str | None,
    data_dir: str,
    file_event_log: str | None,
    workers: int | str,
    max_request_body: str,
    busy_poll_micros: int | str,
    is_tty: bool,
    https_proxy: str | None = None,
    http_proxy: str | None = None,
    no_proxy: str | None = None,
    client_header_timeout: str = "30s",
    client_body_timeout: str = "60s",
    keepalive_timeout: str = "75s",
    graceful_shutdown_timeout: str = "10s",
    database_pool_size: int | str = 10,
    revocation_max_staleness: str = "5s",
    change_feed_push: str = "on",
    encryption_key_check: str = "on",
    prices_path: str | None = None,
    usage_hourly_retention_days: int | str = 90,
    expired_token_retention_days: int | str = 90,
    audit_retention_days: int | str = 0,
    events_stream_max_length: int | str = 100_000,
    events_spool_max_bytes: str = "1GiB",
    events_file_group_idle: str = "60m",
    event_stream: str = "llm-proxy:events",
    ssl_cert_file: str | None = None,
    ssl_cert_dir: str | None = None,
    forwarded_allow_ips: str = "",
) -> Settings:
    """Validate every option; a bad one raises SettingsError naming its variable."""
    host, port = parse_listen_addr(listen_addr)
    worker_count = parse_positive_int("WORKERS", workers, at_most=MAX_WORKERS)
    if port == 0 and worker_count > 1:
        # Each worker would get a port of its own from the system, and none would share it.
        raise SettingsError("LISTEN_ADDR: port 0 (any free port) needs WORKERS=1; give a port")
    data_path = Path(data_dir)
    try:
        # Secrets often come from mounted files, which end in a newline.
        token = configured_token("MANAGEMENT_TOKEN", management_token or "")
        admin_user = configured_password("ADMIN_USER", admin_user)
        password = configured_password("ADMIN_PASSWORD", admin_password or "")
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    if not admin_user:
        raise SettingsError("ADMIN_USER: must not be empty")
    if ":" in admin_user:
        # Basic auth sends "user:password" and splits it at the first colon.
        raise SettingsError("ADMIN_USER: must not hold ':' (no sign-in could give it)")
    return Settings(
        listen_host=host,
        listen_port=port,
        management_token=token,
        admin_user=admin_user,
        admin_password=password,
        database_url=check_database_url(database_url or default_database_url(data_path)),
        encryption_key=parse_encryption_key(encryption_key) if encryption_key else b"",
        api_config_path=Path(api_config_path),
        event_bus=check_choice("LLM_PROXY_EVENT_BUS", event_bus, ("memory", "redis", "none")),  # type: ignore[arg-type]
        redis_url=check_redis_url(redis_url),
        log_level=check_log_level(log_level),
        log_format=check_choice(  # type: ignore[arg-type]
            "LOG_FORMAT", log_format or ("console" if is_tty else "json"), ("console", "json")
        ),
        data_dir=data_path,
        file_event_log=Path(file_event_log) if file_event_log else None,
        workers=worker_count,
        max_request_body_bytes=parse_size("MAX_REQUEST_BODY", max_request_body),
        busy_poll_micros=parse_whole_number(
            "LLM_PROXY_BUSY_POLL_MICROS", busy_poll_micros, at_most=10_000
        ),
        https_proxy=check_proxy_url("HTTPS_PROXY", https_proxy),
        http_proxy=check_proxy_url("HTTP_PROXY", http_proxy),
        no_proxy=check_no_proxy(no_proxy),
        ssl_cert_file=check_trust_path("SSL_CERT_FILE", ssl_cert_file, directory=False),
        ssl_cert_dir=check_trust_path("SSL_CERT_DIR", ssl_cert_dir, directory=True),
        client_header_timeout=parse_seconds("CLIENT_HEADER_TIMEOUT", client_header_timeout),
        client_body_timeout=parse_seconds("CLIENT_BODY_TIMEOUT", client_body_timeout),
        keepalive_timeout=parse_seconds("KEEPALIVE_TIMEOUT", keepalive_timeout),
        graceful_shutdown_timeout=parse_seconds(
            "GRACEFUL_SHUTDOWN_TIMEOUT", graceful_shutdown_timeout
        ),
        database_pool_size=parse_positive_int(
            "DATABASE_POOL_SIZE", database_pool_size, at_most=MAX_DATABASE_POOL_SIZE
        ),
        revocation_max_staleness=parse_seconds(
            "REVOCATION_MAX_STALENESS", revocation_max_staleness
        ),
        change_push=check_choice("CHANGE_FEED_PUSH", change_feed_push, ("on", "off")) == "on",
        encryption_key_check=check_choice(
            "ENCRYPTION_KEY_CHECK", encryption_key_check, ("on", "off")
        )
        == "on",
        prices_path=Path(prices_path) if prices_path else None,
        usage_hourly_retention_days=parse_retention_days(
            "USAGE_HOURLY_RETENTION_DAYS", usage_hourly_retention_days
        ),
        expired_token_retention_days=parse_retention_days(
            "EXPIRED_TOKEN_RETENTION_DAYS", expired_token_retention_days
        ),
        audit_retention_days=parse_retention_days("AUDIT_RETENTION_DAYS", audit_retention_days),
        events_stream_max_length=parse_positive_int(
            "EVENTS_STREAM_MAX_LENGTH", events_stream_max_length
        ),
        events_stream=check_stream_name(event_stream),
        events_spool_max_bytes=parse_size("EVENTS_SPOOL_MAX_BYTES", events_spool_max_bytes),
        events_file_group_idle=parse_seconds("EVENTS_FILE_GROUP_IDLE", events_file_group_idle),
        forwarded_allow_ips=parse_forwarded_allow_ips(forwarded_allow_ips),
    )


@main.command()
@listen_addr_option
@click.option(
    "--management-token",
    envvar="MANAGEMENT_TOKEN",
    show_envvar=True,
    show_default="generated",
    help="Bearer token of the management API. Unset: generated on first start, printed once and"
    " kept in <DATA_DIR>/management_token, where `llm-proxy manage` finds it.",
)
@click.option(
    "--admin-user",
    envvar="ADMIN_USER",
    default="admin",
    show_envvar=True,
    help="User name of the admin pages (/admin/, HTTP basic auth).",
)
@click.option(
    "--admin-password",
    envvar="ADMIN_PASSWORD",
    show_envvar=True,
    show_default="generated",
    help="Password of the admin pages. Unset: generated on first start, printed once and kept in"
    " <DATA_DIR>/admin_password.",
)
@click.option(
    "--database-url",
    envvar="DATABASE_URL",
    show_envvar=True,
    show_default="sqlite:///<DATA_DIR>/llm-proxy.db",
    help="sqlite:///relative.db, sqlite:////absolute.db, or postgresql://user:pass@host/db for"
    " several instances.",
)
@click.option(
    "--encryption-key",
    envvar="ENCRYPTION_KEY",
    show_envvar=True,
    show_default="generated",
    help="base64 of 32 bytes; encrypts the stored upstream keys. Unset: generated on first start"
    " and kept in <DATA_DIR>/encryption_key (back it up).",
)
@click.option(
    "--api-config-path",
    envvar="API_CONFIG_PATH",
    default="config/api_providers.yaml",
    show_envvar=True,
    help="The upstream APIs and their allowlists (YAML).",
)
@click.option(
    "--prices-path",
    envvar="PRICES_PATH",
    show_envvar=True,
    show_default="config/prices.yaml",
    help="Model prices (USD per 1M tokens) for events' cost_usd and budgets; SIGHUP reloads them.",
)
@click.option(
    "--event-bus",
    "--llm-proxy-event-bus",  # (the variable's own name, as every other flag has)
    envvar="LLM_PROXY_EVENT_BUS",
    default="memory",
    show_envvar=True,
    help="Where events go: memory (in-process), redis (Redis Streams, for several processes or"
    " machines) or none.",
)
@click.option(
    "--redis-url",
    envvar="REDIS_URL",
    default="redis://127.0.0.1:6379/0",
    show_envvar=True,
    help="Redis for the event bus and for limits shared by several instances.",
)
@click.option(
    "--log-level",
    envvar="LOG_LEVEL",
    default="info",
    show_envvar=True,
    help="debug, info, warning, error or critical.",
)
@click.option(
    "--log-format",
    envvar="LOG_FORMAT",
    show_envvar=True,
    show_default="console on a TTY, else json",
    help="console or json.",
)
@click.option(
    "--data-dir",
    envvar="DATA_DIR",
    default="./data",
    show_envvar=True,
    help="Where the generated secrets, the SQLite database and the workers' sockets live;"
    " created readable by its owner only.",
)
@click.option(
    "--file-event-log",
    envvar="FILE_EVENT_LOG",
    show_envvar=True,
    help="Write every event to this JSONL file from an in-process dispatcher.",
)
# Parsed by build_settings, not click, so a bad value stops start-up with the one-line error.
@click.option(
    "--workers",
    envvar="WORKERS",
    default="1",
    show_envvar=True,
    help="Server processes sharing the port (1 to 1024); /metrics on any of them sums them all.",
)
@click.option(
    "--max-request-body",
    envvar="MAX_REQUEST_BODY",
    default="64MiB",
    show_envvar=True,
    help="Largest request body accepted on the proxy path.",
)
@click.option(
    "--busy-poll-micros",
    "--llm-proxy-busy-poll-micros",  # (the variable's own name, as every other flag has)
    envvar="LLM_PROXY_BUSY_POLL_MICROS",
    default="0",
    show_envvar=True,
    help="Keep polling sockets up to this long after activity (adaptive; 0, the default: never).",
)
# Read as curl reads them: the lower-case spelling first.
@click.option(
    "--https-proxy",
    envvar=["https_proxy", "HTTPS_PROXY"],
    show_envvar=True,
    help="HTTP proxy that https upstreams are reached through (CONNECT): http://[user:pass@]host:port",
)
@click.option(
    "--http-proxy",
    envvar=["http_proxy", "HTTP_PROXY"],
    show_envvar=True,
    help="HTTP proxy that http upstreams are reached through (CONNECT as well).",
)
@click.option(
    "--no-proxy",
    envvar=["no_proxy", "NO_PROXY"],
    show_envvar=True,
    help="Upstream hosts reached directly: domains (and their subdomains), IPs, CIDRs, :port, or *.",
)
@click.option(
    "--ssl-cert-file",
    envvar="SSL_CERT_FILE",
    show_envvar=True,
    help="PEM bundle of CA certificates upstream TLS trusts besides the system store.",
)
@click.option(
    "--ssl-cert-dir",
    envvar="SSL_CERT_DIR",
    show_envvar=True,
    help="Hashed directory of CA certificates upstream TLS trusts besides the system store.",
)
@click.option(
    "--forwarded-allow-ips",
    envvar="FORWARDED_ALLOW_IPS",
    default="",
    show_envvar=True,
    help="Reverse proxies (IP addresses and CIDR networks, comma-separated; * for every peer)"
    " whose X-Forwarded-For names the client in audit entries and sign-in warnings. Empty"
    " trusts none: the TCP peer is recorded.",
)
@click.option(
    "--client-header-timeout",
    envvar="CLIENT_HEADER_TIMEOUT",
    default="30s",
    show_envvar=True,
    help="A request head must arrive whole within this.",
)
@click.option(
    "--client-body-timeout",
    envvar="CLIENT_BODY_TIMEOUT",
    default="60s",
    show_envvar=True,
    help="Longest gap between request body bytes (408), or in a client's reading of an answer.",
)
@click.option(
    "--keepalive-timeout",
    envvar="KEEPALIVE_TIMEOUT",
    default="75s",
    show_envvar=True,
    help="An idle keep-alive connection is closed after this.",
)
@click.option(
    "--graceful-shutdown-timeout",
    envvar="GRACEFUL_SHUTDOWN_TIMEOUT",
    default="10s",
    show_envvar=True,
    help="After SIGTERM, how long requests in flight (streams) may take to finish; those still"
    " open then are cut (their events say server_stopping). Events and usage are written after"
    " it: give the platform's stop timeout more than this.",
)
@click.option(
    "--database-pool-size",
    envvar="DATABASE_POOL_SIZE",
    default="10",
    show_envvar=True,
    help="PostgreSQL connections each worker keeps open (1 to 1000); its LISTEN connection and"
    " up to two of its events process's come on top.",
)
@click.option(
    "--revocation-max-staleness",
    envvar="REVOCATION_MAX_STALENESS",
    default="5s",
    show_envvar=True,
    help="When the change feed has been silent this long, check every request's token against"
    " the database (fail closed).",
)
@click.option(
    "--change-feed-push",
    envvar="CHANGE_FEED_PUSH",
    default="on",
    show_envvar=True,
    help="on: PostgreSQL pushes management changes to every instance (LISTEN/NOTIFY); off: they"
    " are polled (for poolers that cannot carry LISTEN, such as PgBouncer in transaction mode).",
)
@click.option(
    "--encryption-key-check",
    envvar="ENCRYPTION_KEY_CHECK",
    default="on",
    show_envvar=True,
    help="on: start-up stops when ENCRYPTION_KEY opens none of the upstream keys in the"
    " database (they were stored under another); off: start anyway, after losing the key, to"
    " set each project's key anew (its requests are refused until then).",
)
@click.option(
    "--usage-hourly-retention-days",
    envvar="USAGE_HOURLY_RETENTION_DAYS",
    default="90",
    show_envvar=True,
    help="Days of hourly usage aggregates kept (the admin charts show 30); 0 keeps them all.",
)
@click.option(
    "--expired-token-retention-days",
    envvar="EXPIRED_TOKEN_RETENTION_DAYS",
    default="90",
    show_envvar=True,
    help="Days an expired token is kept (listed, and refused as expired) before it is deleted;"
    " 0 keeps them all.",
)
@click.option(
    "--audit-retention-days",
    envvar="AUDIT_RETENTION_DAYS",
    default="0",
    show_envvar=True,
    help="Days of audit events kept (one is written per token issued); 0 keeps them all.",
)
@click.option(
    "--events-stream-max-length",
    envvar="EVENTS_STREAM_MAX_LENGTH",
    default="100000",
    show_envvar=True,
    help="With LLM_PROXY_EVENT_BUS=redis: entries the stream may hold. Entries every dispatcher"
    " service has acknowledged are trimmed once a minute old; beyond this cap, the oldest go"
    " even unread"
    " (counted in llm_proxy_events_dropped_total).",
)
@click.option(
    "--events-spool-max-bytes",
    envvar="EVENTS_SPOOL_MAX_BYTES",
    default="1GiB",
    show_envvar=True,
    help="With LLM_PROXY_EVENT_BUS=redis: events each server process keeps in its spool under"
    " DATA_DIR while Redis is away; beyond it, further events are dropped (counted in"
    " llm_proxy_events_dropped_total) rather than fill the disk.",
)
@click.option(
    "--events-file-group-idle",
    envvar="EVENTS_FILE_GROUP_IDLE",
    default="60m",
    show_envvar=True,
    help="With LLM_PROXY_EVENT_BUS=redis: a --file-event-log consumer group (file@<host>:<path>)"
    " that no one has read for this long (keep it above a minute) is taken for that of an"
    " instance that is gone (a new container has a new host name) and deleted, so that it no"
    " longer holds the stream; what it had not read is counted in llm_proxy_events_dropped_total."
    " Dispatcher services' groups are never deleted.",
)
@click.option(
    "--event-stream",
    "--llm-proxy-event-stream",
    envvar="LLM_PROXY_EVENT_STREAM",
    default="llm-proxy:events",
    show_envvar=True,
    help="With LLM_PROXY_EVENT_BUS=redis: the stream events are published on; the dispatchers"
    " read the same variable (several deployments can share one Redis).",
)
@required_settings_option
@click.pass_context
def server(context: click.Context, /, **options: str | int | None) -> None:
    """Run the proxy, the management API and the admin pages.

    Secrets left unset are generated on the first start, printed that once, and kept under
    DATA_DIR; later starts reuse them.
    """
    try:
        check_required_settings(context)
        settings = build_settings(**options, is_tty=sys.stderr.isatty())  # type: ignore[arg-type]
        settings.export_trust_paths()
        load_api_config(settings.api_config_path)
        settings.price_file.load()
    except SettingsError as exc:
        click.echo(f"llm-proxy: {exc}", err=True)
        sys.exit(2)
    except ApiConfigError as exc:
        # YAML parser messages span several lines; start-up errors are one.
        click.echo(f"llm-proxy: API_CONFIG_PATH: {' '.join(str(exc).split())}", err=True)
        sys.exit(2)
    except PricesError as exc:
        click.echo(f"llm-proxy: PRICES_PATH: {exc}", err=True)
        sys.exit(2)
    from llm_proxy.runtime.server import run_server

    configure_logging(settings.log_level, settings.log_format, secrets=settings.log_secrets)
    try:
        with owner_only_files():
            run_server(settings)
    except SettingsError as exc:
        click.echo(f"llm-proxy: {exc}", err=True)
        sys.exit(1)


@main.command()
@click.option(
    "--database-url",
    envvar="DATABASE_URL",
    show_envvar=True,
    show_default="sqlite:///<DATA_DIR>/llm-proxy.db",
    help="The database to migrate.",
)
@click.option(
    "--data-dir",
    envvar="DATA_DIR",
    default="./data",
    show_envvar=True,
    help="Where the default SQLite database lives.",
)
@required_settings_option
@click.pass_context
def migrate(context: click.Context, /, database_url: str | None, data_dir: str) -> None:
    """Apply the database migrations and exit (for deployments that migrate before rolling out)."""
    from llm_proxy.runtime.server import migrate_database

    try:
        check_required_settings(context, reads_all=False)
        url = check_database_url(database_url or default_database_url(Path(data_dir)))
    except SettingsError as exc:  # a bad setting, as the server's start-up says it: exit 2
        click.echo(f"llm-proxy: {exc}", err=True)
        sys.exit(2)
    try:
        with owner_only_files():
            applied, label = migrate_database(url, Path(data_dir))
    except SettingsError as exc:
        click.echo(f"llm-proxy: {exc}", err=True)
        sys.exit(1)
    versions = ", ".join(f"{v:03d}" for v in applied) if applied else "none (up to date)"
    click.echo(f"{label}: migrations applied: {versions}")


main.add_command(manage)
main.add_command(mock_upstream_command)
main.add_command(benchmark_command)
main.add_command(dispatcher_command)
main.add_command(healthcheck_command)
