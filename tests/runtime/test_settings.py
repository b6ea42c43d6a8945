"""Settings: environment → frozen settings, one-line errors, generated secrets."""

from __future__ import annotations

import base64
import dataclasses
import io
import ipaddress
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from llm_proxy.client_address import ForwardedTrust
from llm_proxy.pricing import PriceFile
from llm_proxy.runtime import secrets_store
from llm_proxy.runtime.app import events_config
from llm_proxy.runtime.cli import build_settings
from llm_proxy.runtime.cli import server as server_command
from llm_proxy.runtime.required_settings import check_required_settings
from llm_proxy.runtime.server import FilledSecrets, announce, with_generated_secrets
from llm_proxy.runtime.settings import (
    Settings,
    SettingsError,
    parse_listen_addr,
    parse_size,
    sqlite_path_from_url,
)
from tests.certificates import self_signed
from tests.processes import PRODUCT_VARIABLES

KEY = base64.b64encode(bytes(range(32))).decode()


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PRODUCT_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def settings_from_environment(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], *args: str, is_tty: bool = False
) -> Settings:
    """What ``llm-proxy server`` builds from these variables and flags, without serving."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ctx = server_command.make_context("server", list(args))
    return build_settings(**ctx.params, is_tty=is_tty)


def test_defaults_match_the_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from_environment(monkeypatch, {})
    assert (settings.listen_host, settings.listen_port) == ("127.0.0.1", 8080)
    assert settings.management_token == ""  # generated at start
    assert settings.admin_user == "admin"
    assert settings.admin_password == ""
    assert settings.encryption_key == b""
    assert settings.database_url == "sqlite:///data/llm-proxy.db"
    assert settings.sqlite_path == Path("data/llm-proxy.db")
    assert settings.api_config_path == Path("config/api_providers.yaml")
    assert settings.event_bus == "memory"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.log_level == "info"
    assert settings.log_format == "json"
    assert settings.data_dir == Path("data")
    assert settings.workers == 1
    assert settings.max_request_body_bytes == 64 * 1024 * 1024
    assert settings.file_event_log is None
    # PRICES_PATH left unset: config/prices.yaml, and no prices rather than an error without it
    # (a config directory of the operator's own, mounted over the image's, may hold none).
    assert settings.price_file == PriceFile(Path("config/prices.yaml"), optional=True)


def test_log_format_defaults_to_console_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_from_environment(monkeypatch, {}, is_tty=True).log_format == "console"


def test_every_variable_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = {
        "LISTEN_ADDR": "0.0.0.0:9001",
        "MANAGEMENT_TOKEN": "mgmt-from-env",
        "ADMIN_USER": "root",
        "ADMIN_PASSWORD": "hunter2",
        "DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite",
        "ENCRYPTION_KEY": KEY,
        "API_CONFIG_PATH": "/etc/llm-proxy/providers.yaml",
        "LLM_PROXY_EVENT_BUS": "redis",
        "REDIS_URL": "redis://cache:6380/2",
        "LOG_LEVEL": "DEBUG",
        "LOG_FORMAT": "console",
        "DATA_DIR": str(tmp_path),
        "FILE_EVENT_LOG": str(tmp_path / "events.jsonl"),
        "WORKERS": "4",
        "MAX_REQUEST_BODY": "512k",
        "LLM_PROXY_BUSY_POLL_MICROS": "0",
        "PRICES_PATH": "/etc/llm-proxy/prices.yaml",
    }
    settings = settings_from_environment(monkeypatch, env)
    assert (settings.listen_host, settings.listen_port) == ("0.0.0.0", 9001)
    assert settings.management_token == "mgmt-from-env"
    assert settings.admin_user == "root"
    assert settings.admin_password == "hunter2"
    assert settings.sqlite_path == tmp_path / "db.sqlite"
    assert settings.encryption_key == bytes(range(32))
    assert settings.api_config_path == Path("/etc/llm-proxy/providers.yaml")
    assert settings.event_bus == "redis"
    assert settings.redis_url == "redis://cache:6380/2"
    assert settings.log_level == "debug"
    assert settings.log_format == "console"
    assert settings.data_dir == tmp_path
    assert settings.file_event_log == tmp_path / "events.jsonl"
    assert settings.workers == 4
    assert settings.max_request_body_bytes == 512 * 1024
    assert settings.busy_poll_micros == 0
    # Set, the file must be there.
    assert settings.price_file == PriceFile(Path("/etc/llm-proxy/prices.yaml"))


def test_the_event_bus_flag_has_its_variable_s_name_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # LLM_PROXY_EVENT_BUS -> --llm-proxy-event-bus, as LISTEN_ADDR -> --listen-addr (SPEC §4)
    settings = settings_from_environment(monkeypatch, {}, "--llm-proxy-event-bus", "none")
    assert settings.event_bus == "none"


def test_trust_paths_are_flags_too(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bundle, _ = self_signed(tmp_path, "ca", x509.DNSName("ca.test"))
    settings = settings_from_environment(
        monkeypatch, {}, "--ssl-cert-file", str(bundle), "--ssl-cert-dir", str(tmp_path)
    )
    assert (settings.ssl_cert_file, settings.ssl_cert_dir) == (str(bundle), str(tmp_path))
    monkeypatch.setenv("SSL_CERT_FILE", "")  # (restored after the test)
    monkeypatch.setenv("SSL_CERT_DIR", "")
    settings.export_trust_paths()  # where OpenSSL reads them, as the server does at start
    assert (os.environ["SSL_CERT_FILE"], os.environ["SSL_CERT_DIR"]) == (str(bundle), str(tmp_path))
    with pytest.raises(SettingsError, match=r"^SSL_CERT_DIR: .* is not a directory$"):
        settings_from_environment(monkeypatch, {}, "--ssl-cert-dir", str(bundle))


def test_a_flag_wins_over_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from_environment(
        monkeypatch, {"LISTEN_ADDR": "127.0.0.1:1"}, "--listen-addr", "127.0.0.1:2"
    )
    assert settings.listen_port == 2


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LISTEN_ADDR", "nonsense"),
        ("LISTEN_ADDR", "127.0.0.1:70000"),
        ("LISTEN_ADDR", "127.0.0.1:http"),
        ("DATABASE_URL", "mysql://db/llm"),
        ("DATABASE_URL", "sqlite:///"),
        ("DATABASE_URL", "sqlite://relative.db"),
        ("DATABASE_URL", "no-scheme"),
        ("ENCRYPTION_KEY", "short"),
        ("ENCRYPTION_KEY", base64.b64encode(b"x" * 16).decode()),
        ("ENCRYPTION_KEY", "!" * 44),
        ("LLM_PROXY_EVENT_BUS", "kafka"),
        ("REDIS_URL", "http://cache:6379"),
        ("LOG_LEVEL", "loud"),
        ("LOG_FORMAT", "xml"),
        ("MAX_REQUEST_BODY", "lots"),
        ("MAX_REQUEST_BODY", "0"),
        ("WORKERS", "0"),
        ("WORKERS", "many"),
        ("WORKERS", "1025"),
        ("WORKERS", "100000000000000000000"),
        ("LLM_PROXY_BUSY_POLL_MICROS", "-1"),
        ("LLM_PROXY_BUSY_POLL_MICROS", "20000"),
        ("LLM_PROXY_BUSY_POLL_MICROS", "soon"),
        ("ADMIN_USER", " "),
        ("DATABASE_POOL_SIZE", "0"),
        ("DATABASE_POOL_SIZE", "1001"),
        ("DATABASE_POOL_SIZE", "100000000000000000000"),
        ("REVOCATION_MAX_STALENESS", "never"),
        ("REVOCATION_MAX_STALENESS", "0s"),
        ("CHANGE_FEED_PUSH", "maybe"),
        ("ENCRYPTION_KEY_CHECK", "maybe"),
        ("USAGE_HOURLY_RETENTION_DAYS", "-1"),
        ("USAGE_HOURLY_RETENTION_DAYS", "a month"),
        ("USAGE_HOURLY_RETENTION_DAYS", "36501"),
        ("EXPIRED_TOKEN_RETENTION_DAYS", "-1"),
        ("EXPIRED_TOKEN_RETENTION_DAYS", "a month"),
        ("EXPIRED_TOKEN_RETENTION_DAYS", "36501"),
        ("AUDIT_RETENTION_DAYS", "-1"),
        ("AUDIT_RETENTION_DAYS", "a year"),
        ("AUDIT_RETENTION_DAYS", "36501"),
        ("SSL_CERT_FILE", "/nonexistent/ca.pem"),
        ("SSL_CERT_FILE", __file__),  # a file, but no certificate in it
        ("SSL_CERT_DIR", "/nonexistent/certs"),
        ("LLM_PROXY_EVENT_STREAM", " "),
        ("FORWARDED_ALLOW_IPS", "balancer.internal"),
        ("FORWARDED_ALLOW_IPS", "10.0.0.1/8"),  # host bits set: 10.0.0.0/8 meant?
        ("FORWARDED_ALLOW_IPS", "10.0.0.0/8; 127.0.0.1"),
    ],
)
def test_a_bad_value_names_its_variable_on_one_line(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        settings_from_environment(monkeypatch, {variable: value})
    message = str(caught.value)
    assert message.startswith(f"{variable}: ")
    assert "\n" not in message


# 32 bytes whose base64 holds both characters the URL-safe alphabet replaces ("+/" and "-_").
SPELLED_KEY = bytes([0xFB, 0xFF, 0xBF] * 10 + [0xFE, 0xFF])


@pytest.mark.parametrize(
    "written",
    [
        base64.b64encode(SPELLED_KEY).decode().rstrip("="),  # padding left off
        base64.urlsafe_b64encode(SPELLED_KEY).decode(),  # as Fernet.generate_key() writes keys
        base64.urlsafe_b64encode(SPELLED_KEY).decode().rstrip("="),  # as secrets.token_urlsafe
    ],
)
def test_an_encryption_key_in_another_base64_spelling_is_the_same_key(
    monkeypatch: pytest.MonkeyPatch, written: str
) -> None:
    # Before, only padded standard base64 was taken: a key generated as Fernet.generate_key()
    # or secrets.token_urlsafe(32) write it stopped start-up, "expected base64 of exactly 32
    # bytes", though it is base64 of exactly 32 bytes.
    settings = settings_from_environment(monkeypatch, {"ENCRYPTION_KEY": written})
    assert settings.encryption_key == SPELLED_KEY
    assert written in settings.log_secrets  # never logged as it was written either


@pytest.mark.parametrize(
    "written",
    [
        base64.b64encode(SPELLED_KEY).decode()[:-2] + "-/",  # both alphabets at once
        base64.b64encode(SPELLED_KEY).decode() + "=",  # padding where none belongs
        base64.b64encode(SPELLED_KEY).decode()[:-2],  # one character short of 32 bytes
    ],
)
def test_an_encryption_key_that_is_not_one_base64_spelling_is_refused(
    monkeypatch: pytest.MonkeyPatch, written: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        settings_from_environment(monkeypatch, {"ENCRYPTION_KEY": written})
    assert str(caught.value) == "ENCRYPTION_KEY: expected base64 of exactly 32 bytes"


def test_the_event_stream_is_llm_proxy_events_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_from_environment(monkeypatch, {}).events_stream == "llm-proxy:events"
    told = settings_from_environment(monkeypatch, {"LLM_PROXY_EVENT_STREAM": "tenant-a:events"})
    assert told.events_stream == "tenant-a:events"


def test_the_event_stream_cap_is_100000_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_from_environment(monkeypatch, {}).events_stream_max_length == 100_000
    told = settings_from_environment(monkeypatch, {"EVENTS_STREAM_MAX_LENGTH": "5000000"})
    assert told.events_stream_max_length == 5_000_000
    assert events_config(told).maxlen == 5_000_000
    with pytest.raises(SettingsError, match=r"^EVENTS_STREAM_MAX_LENGTH: "):
        settings_from_environment(monkeypatch, {"EVENTS_STREAM_MAX_LENGTH": "0"})


def test_the_event_spool_holds_1gib_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_from_environment(monkeypatch, {}).events_spool_max_bytes == 1024**3
    told = settings_from_environment(monkeypatch, {"EVENTS_SPOOL_MAX_BYTES": "200MiB"})
    assert events_config(told).spool_max_bytes == 200 * 1024**2
    with pytest.raises(SettingsError, match=r"^EVENTS_SPOOL_MAX_BYTES: "):
        settings_from_environment(monkeypatch, {"EVENTS_SPOOL_MAX_BYTES": "a lot"})


def test_a_file_log_group_unread_for_an_hour_is_taken_for_a_gone_instances_unless_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert events_config(settings_from_environment(monkeypatch, {})).gone_group_idle == 3600
    told = settings_from_environment(monkeypatch, {"EVENTS_FILE_GROUP_IDLE": "10m"})
    assert events_config(told).gone_group_idle == 600
    with pytest.raises(SettingsError, match=r"^EVENTS_FILE_GROUP_IDLE: "):
        settings_from_environment(monkeypatch, {"EVENTS_FILE_GROUP_IDLE": "0"})


def test_no_balancer_is_trusted_to_name_the_client_unless_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert settings_from_environment(monkeypatch, {}).forwarded_allow_ips == ForwardedTrust()
    told = settings_from_environment(
        monkeypatch, {"FORWARDED_ALLOW_IPS": " 10.0.0.0/8 , 2001:db8::1,*"}
    ).forwarded_allow_ips
    assert told == ForwardedTrust(
        (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::1")), every_peer=True
    )
    flag = settings_from_environment(monkeypatch, {}, "--forwarded-allow-ips", "127.0.0.1")
    assert flag.forwarded_allow_ips.networks == (ipaddress.ip_network("127.0.0.1"),)


def test_hourly_usage_is_kept_90_days_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_from_environment(monkeypatch, {}).usage_hourly_retention_days == 90
    told = settings_from_environment(monkeypatch, {"USAGE_HOURLY_RETENTION_DAYS": "0"})
    assert told.usage_hourly_retention_days == 0  # keeps every hour


def test_expired_tokens_are_kept_90_days_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_from_environment(monkeypatch, {}).expired_token_retention_days == 90
    told = settings_from_environment(monkeypatch, {"EXPIRED_TOKEN_RETENTION_DAYS": "0"})
    assert told.expired_token_retention_days == 0  # keeps every token


def test_audit_events_are_kept_for_good_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_from_environment(monkeypatch, {}).audit_retention_days == 0
    told = settings_from_environment(monkeypatch, {"AUDIT_RETENTION_DAYS": "365"})
    assert told.audit_retention_days == 365


@pytest.mark.parametrize(
    ("url", "normalised"),
    [
        ("postgresql://u:pw@db:5433/llm", "postgresql://u:pw@db:5433/llm"),
        ("postgres://u@db/llm", "postgresql://u@db/llm"),
        ("postgresql+asyncpg://u@db/llm?sslmode=require", "postgresql://u@db/llm?sslmode=require"),
        # SQLAlchemy's names for the psycopg drivers: the URL of an application an operator copies.
        ("postgresql+psycopg2://u:pw@db/llm", "postgresql://u:pw@db/llm"),
        (
            "postgresql+psycopg://u:pw@db/llm?sslmode=require",
            "postgresql://u:pw@db/llm?sslmode=require",
        ),
        ("postgresql://u:pw@db:5433,db2/llm", "postgresql://u:pw@db:5433,db2/llm"),  # failover
        # SQLAlchemy's asyncpg dialect names the TLS mode ssl=; asyncpg reads it as sslmode=.
        (
            "postgresql+asyncpg://u:pw@db/llm?application_name=x&ssl=verify-full",
            "postgresql://u:pw@db/llm?application_name=x&sslmode=verify-full",
        ),
        ("postgresql://u@db/llm?sslrootcert=/ca.pem", "postgresql://u@db/llm?sslrootcert=/ca.pem"),
    ],
)
def test_postgresql_urls_are_accepted_in_their_usual_spellings(url: str, normalised: str) -> None:
    settings = build_settings(**_cli_defaults(), database_url=url, is_tty=False)
    assert settings.database_url == normalised
    assert "pw" not in settings.database_label
    assert settings.database_label.startswith("postgresql://db")


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("postgresql://u:secret@db:port/llm", "port is not a number"),
        ("postgresql://u:secret@db:5432,db2:port/llm", "port is not a number"),
        ("postgresql://u:secret@db", "names no database"),
        ("mysql://u:secret@db/llm", "unsupported scheme 'mysql'"),
        ("postgresql:u:secret@db/llm", "expected postgresql://"),
        ("postgres:/u:secret@db/llm", "expected postgresql://"),
    ],
)
def test_a_bad_database_url_is_named_without_its_password(url: str, complaint: str) -> None:
    with pytest.raises(SettingsError, match=r"^DATABASE_URL: ") as caught:
        build_settings(**_cli_defaults(), database_url=url, is_tty=False)
    assert complaint in str(caught.value)
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("postgresql://u:p@ss:secret@db:5432/llm", "%40"),
        ("postgresql://u:secret@ss@db/llm", "%40"),
        ("postgresql://u:secret@[::1/llm", "IPv6"),
        ("postgresql://u:secret@[::zz]/llm", "IPv6"),
        ("postgresql://u:secret@::1]/llm", "IPv6"),
        ("postgresql://u:secret@db:54x32/llm", "percent-encode"),
        ("postgresql+asyncpg://u:secret@db/llm?ssl=require&sslmode=disable", "ssl= or as sslmode="),
        ("postgresql://u:secret@db/llm?connect_timeout=soon", "connect_timeout must be a whole"),
        ("postgresql://u:secret@db/llm?connect_timeout=5&connect_timeout=9", "given 2 times"),
    ],
)
def test_a_database_url_asyncpg_would_read_otherwise_is_refused_without_its_password(
    url: str, complaint: str
) -> None:
    with pytest.raises(SettingsError, match=r"^DATABASE_URL: ") as caught:
        build_settings(**_cli_defaults(), database_url=url, is_tty=False)
    assert complaint in str(caught.value)
    assert "secret" not in str(caught.value) and "\n" not in str(caught.value)


def test_an_at_sign_percent_encoded_in_the_password_is_accepted() -> None:
    url = "postgresql://u:p%40ss%3Asecret@db:5432/llm"
    assert build_settings(**_cli_defaults(), database_url=url, is_tty=False).database_url == url


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis://:secret@[::1/0", "IPv6"),
        ("redis://:secret@127.0.0.1:x/0", "port is not a number"),
        ("http://:secret@127.0.0.1/0", "expected a redis://"),
        ("redis://:secret@127.0.0.1/0?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
        ("redis://:secret@127.0.0.1/0?sockettimeout=1", "unknown option 'sockettimeout'"),
        ("unix://:secret@/run/redis.sock?socket_keepalive=true", "option 'socket_keepalive'"),
    ],
)
def test_a_bad_redis_url_is_one_line_without_its_password(url: str, complaint: str) -> None:
    with pytest.raises(SettingsError, match=r"^REDIS_URL: ") as caught:
        build_settings(**{**_cli_defaults(), "redis_url": url}, database_url=None, is_tty=False)
    assert complaint in str(caught.value)
    assert "secret" not in str(caught.value) and "\n" not in str(caught.value)


def _cli_defaults() -> dict[str, Any]:
    params = server_command.make_context("server", []).params
    return {k: v for k, v in params.items() if k != "database_url"}


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///./x.db", Path("x.db")),
        ("sqlite:///x.db", Path("x.db")),
        ("sqlite:///data/sub/x.db", Path("data/sub/x.db")),
        ("sqlite:////abs/x.db", Path("/abs/x.db")),
        ("sqlite:////srv/llm proxy/x.db", Path("/srv/llm proxy/x.db")),
    ],
)
def test_sqlite_urls_follow_the_sqlalchemy_slash_convention(url: str, path: Path) -> None:
    assert sqlite_path_from_url(url) == path
    assert Settings(database_url=url).sqlite_path == path


@pytest.mark.parametrize(
    ("data_dir", "expected"),
    [
        ("./data", Path("data/llm-proxy.db")),
        ("/var/lib/llm-proxy", Path("/var/lib/llm-proxy/llm-proxy.db")),
    ],
)
def test_the_default_database_lives_under_data_dir(
    monkeypatch: pytest.MonkeyPatch, data_dir: str, expected: Path
) -> None:
    settings = settings_from_environment(monkeypatch, {"DATA_DIR": data_dir})
    assert settings.sqlite_path == expected
    assert settings.sqlite_path.is_absolute() == Path(data_dir).is_absolute()


def test_an_explicit_database_url_ignores_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = settings_from_environment(
        monkeypatch, {"DATA_DIR": str(tmp_path), "DATABASE_URL": "sqlite:////srv/other.db"}
    )
    assert settings.sqlite_path == Path("/srv/other.db")


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        (":9000", ("0.0.0.0", 9000)),
        ("[::1]:9000", ("::1", 9000)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_listen_addr_forms(value: str, address: tuple[str, int]) -> None:
    assert parse_listen_addr(value) == address


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("1048576", 1048576),
        ("512k", 512 * 1024),
        ("64MiB", 64 * 1024**2),
        ("64mb", 64 * 1024**2),
        ("1G", 1024**3),
        (" 10 b ", 10),
    ],
)
def test_sizes(value: str, size: int) -> None:
    assert parse_size("MAX_REQUEST_BODY", value) == size


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.listen_port = 1  # type: ignore[misc]


def test_repr_masks_every_secret() -> None:
    settings = Settings(
        management_token="mgmt-very-secret-value",
        admin_password="admin-very-secret",
        encryption_key=b"K" * 32,
        database_url="postgresql://llm:db%40very-secret@db:5432/llm?password=q-secret&sslmode=require",
        redis_url="redis://:redis-very-secret@cache:6379/0",
        https_proxy="http://egress:proxy-very-secret@proxy:3128",
    )
    shown = repr(settings)
    for secret in (
        "mgmt-very-secret-value",
        "admin-very-secret",
        "KKKK",
        "very-secret",
        "q-secret",
    ):
        assert secret not in shown
    assert "listen_port=8080" in shown
    # The rest of each URL stays, for debugging.
    assert "database_url='postgresql://llm:***@db:5432/llm?password=***&sslmode=require'" in shown
    assert "redis_url='redis://:***@cache:6379/0'" in shown
    assert "https_proxy='http://egress:***@proxy:3128'" in shown
    assert "http_proxy=None" in shown


# -- secrets_store ---------------------------------------------------------------------------


def test_a_secret_is_generated_once_with_mode_0600_and_reused(tmp_path: Path) -> None:
    made: list[str] = []

    def make() -> str:
        made.append(f"value-{len(made)}")
        return made[-1]

    data_dir = tmp_path / "fresh" / "data"
    first = secrets_store.load_or_create(data_dir, "management_token", make)
    assert first == secrets_store.GeneratedSecret("value-0", created=True)
    path = data_dir / "management_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "value-0\n"
    second = secrets_store.load_or_create(data_dir, "management_token", make)
    assert second == secrets_store.GeneratedSecret("value-0", created=False)
    assert made == ["value-0"]
    assert sorted(p.name for p in data_dir.iterdir()) == ["management_token"]


def test_a_generated_secret_is_on_disk_before_it_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file's bytes, then its name in the directory, are synced before ``load_or_create``
    returns: upstream keys are sealed with the encryption key from then on, and a power cut that
    left its file empty or missing would have the next start generate one that opens none."""
    synced: list[tuple[str, str]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        synced.append((str(target), target.read_text() if target.is_file() else "a directory"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    secrets_store.load_or_create(tmp_path, "encryption_key", lambda: "sealed-with-this")
    # The temporary file, full, before it takes the real name; then the directory holding it.
    assert synced == [
        (str(tmp_path / "encryption_key.tmp"), "sealed-with-this\n"),
        (str(tmp_path), "a directory"),
    ]
    assert (tmp_path / "encryption_key").read_text() == "sealed-with-this\n"


def test_an_operator_supplied_secret_file_is_used_as_is(tmp_path: Path) -> None:
    (tmp_path / "admin_password").write_text("chosen-by-hand\n")
    secret = secrets_store.load_or_create(tmp_path, "admin_password", lambda: "generated")
    assert secret == secrets_store.GeneratedSecret("chosen-by-hand", created=False)


def test_generated_secret_values_are_strong() -> None:
    assert secrets_store.new_management_token().startswith("mgmt-")
    assert len(secrets_store.new_management_token()) >= 40
    assert len(base64.b64decode(secrets_store.new_encryption_key(), validate=True)) == 32
    assert len(secrets_store.new_admin_password()) >= 20
    assert secrets_store.new_management_token() != secrets_store.new_management_token()


# -- with_generated_secrets ------------------------------------------------------------------


def test_missing_secrets_are_generated_and_announced_once_served(tmp_path: Path) -> None:
    filled = with_generated_secrets(Settings(data_dir=tmp_path, admin_user="ops"))
    settings, banner = filled.settings, filled.banner
    assert f"MANAGEMENT_TOKEN={settings.management_token}\n" in banner
    assert f"ADMIN_USER=ops ADMIN_PASSWORD={settings.admin_password}\n" in banner
    assert settings.management_token.startswith("mgmt-")
    assert len(settings.encryption_key) == 32
    assert base64.b64encode(settings.encryption_key).decode() not in banner
    for name in ("management_token", "admin_password", "encryption_key"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert banner not in repr(filled)

    # A start that stopped before it served showed nothing: the next one has them to show.
    assert with_generated_secrets(Settings(data_dir=tmp_path, admin_user="ops")) == filled
    out = io.StringIO()
    announce(banner, tmp_path, out)  # that start serves
    assert out.getvalue() == banner + "\n"
    again = with_generated_secrets(Settings(data_dir=tmp_path, admin_user="ops"))
    assert again == FilledSecrets(settings)  # printed once: nothing left to show
    announce(banner, tmp_path, out)  # and a second worker of that start does not show them
    assert out.getvalue() == banner + "\n"


def test_provided_secrets_are_neither_stored_nor_printed(tmp_path: Path) -> None:
    given = Settings(
        data_dir=tmp_path,
        management_token="mgmt-given-by-operator",
        admin_password="given-password",
        encryption_key=b"k" * 32,
    )
    assert with_generated_secrets(given) == FilledSecrets(given)
    assert not any(tmp_path.iterdir())


def test_only_the_missing_secret_is_printed(tmp_path: Path) -> None:
    filled = with_generated_secrets(
        Settings(
            data_dir=tmp_path, management_token="mgmt-given-by-operator", encryption_key=b"k" * 32
        )
    )
    printed = filled.banner
    assert "mgmt-given-by-operator" not in printed
    assert "MANAGEMENT_TOKEN=" not in printed
    assert f"ADMIN_PASSWORD={filled.settings.admin_password}" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["admin_password", "credentials_unshown"]


def test_an_unusable_data_dir_is_a_settings_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SettingsError, match=r"^DATA_DIR: "):
        with_generated_secrets(Settings(data_dir=blocker / "data"))


@pytest.mark.parametrize("secrets_given", [False, True])
def test_a_data_dir_that_is_a_file_is_refused_and_left_as_it_was(
    tmp_path: Path, secrets_given: bool
) -> None:
    # Before, the file an operator named by mistake (an env file, say) was made owner-only
    # (0644 -> 0600) on the way to the refusal, every secret given or not.
    named = tmp_path / "llm-proxy.env"
    named.write_text("LOG_LEVEL=info\n")
    named.chmod(0o644)
    given = {"management_token": "mgmt-given", "admin_password": "pw", "encryption_key": b"k" * 32}
    with pytest.raises(SettingsError) as caught:
        with_generated_secrets(Settings(data_dir=named, **(given if secrets_given else {})))
    assert str(caught.value) == f"DATA_DIR: cannot keep secrets in {named}: Not a directory"
    assert stat.S_IMODE(named.stat().st_mode) == 0o644
    assert named.read_text() == "LOG_LEVEL=info\n"


def check_required_from_environment(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], *args: str
) -> None:
    """The check ``llm-proxy server`` makes of REQUIRED_SETTINGS, before anything else."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    check_required_settings(server_command.make_context("server", list(args)))


@pytest.mark.parametrize(
    ("env", "args", "missing"),
    [
        ({"MANAGEMENT_TOKEN": ""}, (), "MANAGEMENT_TOKEN"),  # a Secret's key, present but empty
        ({"MANAGEMENT_TOKEN": " \n"}, (), "MANAGEMENT_TOKEN"),  # blanks are cut: empty too
        ({}, (), "MANAGEMENT_TOKEN"),
        ({"MANAGEMENT_TOKEN": "mgmt-x", "REDIS_URL": ""}, (), "REDIS_URL"),  # not its default
        ({"MANAGEMENT_TOKEN": "mgmt-x"}, (), "REDIS_URL"),
    ],
)
def test_required_settings_stop_start_up_naming_one_not_given(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], args: tuple[str, ...], missing: str
) -> None:
    env = {"REQUIRED_SETTINGS": "MANAGEMENT_TOKEN, REDIS_URL", **env}
    with pytest.raises(SettingsError) as caught:
        check_required_from_environment(monkeypatch, env, *args)
    message = str(caught.value)
    assert message.startswith(f"{missing}: unset or empty, and REQUIRED_SETTINGS requires it")
    assert "\n" not in message


def test_required_settings_given_by_variable_or_flag_let_start_up_go_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {
        "REQUIRED_SETTINGS": "MANAGEMENT_TOKEN,REDIS_URL,HTTPS_PROXY",
        "https_proxy": "http://p:3128",
    }
    check_required_from_environment(
        monkeypatch, {**env, "REDIS_URL": "redis://127.0.0.1:6379/0"}, "--management-token", "t"
    )
    check_required_from_environment(monkeypatch, {}, "--required-settings", "")  # none required


def test_required_settings_refuse_a_name_that_is_no_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A misspelt name would otherwise require nothing, silently.
    with pytest.raises(SettingsError, match=r"^REQUIRED_SETTINGS: 'MANAGEMENT_TOKN' is not a"):
        check_required_from_environment(monkeypatch, {"REQUIRED_SETTINGS": "MANAGEMENT_TOKN"})
