"""``api_providers.yaml``: the upstream, its allowlist, timeouts, parameter whitelist and CORS.

Path checks run on every request, so the allowlist is compiled into a set of allowed prefixes and a
request path is matched by walking its segment boundaries (O(segments), no regex).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

from llm_proxy import config_yaml
from llm_proxy.config_yaml import DuplicateKeyError
from llm_proxy.http.upstream import Origin, Timeouts

DEFAULT_METHODS = ("GET", "POST", "DELETE", "OPTIONS")
# RFC 9110 methods and PATCH: anything else in allowed_methods is a typo.
STANDARD_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
TOP_LEVEL_KEYS = ("default_api", "apis", "token_info_path")
PROVIDER_KEYS = (
    "base_url",
    "allowed_endpoints",
    "allowed_methods",
    "timeouts",
    "param_whitelist",
    "allowed_origins",
    "inject_stream_usage",
)
TIMEOUT_KEYS = ("connect", "response_header", "idle")
_ENCODED_SEPARATOR = re.compile(r"%(?:2e|2f|5c|00)", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


class ApiConfigError(ValueError):
    """The providers file is unusable; the message says where."""


@dataclass(frozen=True)
class ApiProvider:
    name: str
    origin: Origin
    allowed_prefixes: frozenset[str]
    allowed_methods: frozenset[str]
    timeouts: Timeouts
    param_whitelist: Mapping[str, tuple[str, ...]]
    allowed_origins: frozenset[str]
    inject_stream_usage: bool = True

    def path_allowed(self, path: str) -> bool:
        """True when ``path`` equals an allowed endpoint or continues it after a ``/``."""
        prefixes = self.allowed_prefixes
        if path in prefixes:
            return True
        cut = path.find("/", 1)
        while cut != -1:
            if path[:cut] in prefixes:
                return True
            cut = path.find("/", cut + 1)
        return False

    def origin_allowed(self, origin: str) -> bool:
        return "*" in self.allowed_origins or origin in self.allowed_origins

    def disallowed_param(self, body: Mapping[str, Any]) -> str | None:
        """The first whitelisted parameter whose value matches none of its glob patterns."""
        for name, patterns in self.param_whitelist.items():
            if name not in body:
                continue
            value = body[name]
            if not isinstance(value, str) or not any(
                fnmatch.fnmatchcase(value, p) for p in patterns
            ):
                return name
        return None


DEFAULT_TOKEN_INFO_PATH = "/v1/llm-proxy/token"


@dataclass(frozen=True)
class ApiConfig:
    default: ApiProvider
    providers: Mapping[str, ApiProvider]
    # Where a withering token can read its own expiry and quota; always allowed, never forwarded.
    token_info_path: str = DEFAULT_TOKEN_INFO_PATH


def normalise_path(raw_path: str) -> str | None:
    """The canonical form of a request path, or None when it must be refused.

    Encoded slashes and backslashes, dot segments (also percent-encoded, once or twice, or with a
    ``;`` parameter) and NUL bytes are refused rather than resolved: a client has no honest reason
    to send them, and resolving them is how prefix allowlists get bypassed, here or at an upstream
    that decodes once more. Repeated slashes collapse and a trailing slash is dropped.
    """
    if _already_canonical(raw_path):
        return raw_path
    lowered = raw_path.lower()
    if "%2f" in lowered or "%5c" in lowered or "\\" in raw_path or "%00" in lowered:
        return None
    try:
        # Strict: an overlong form such as %c0%ae is a dot to some decoders, and no UTF-8 at all.
        path = unquote(raw_path, errors="strict") if "%" in raw_path else raw_path
    except UnicodeDecodeError:
        return None
    if not path.startswith("/") or "\x00" in path:
        return None
    if "%" in path and _ENCODED_SEPARATOR.search(path):
        return None  # double-encoded: "%252e" decodes to "%2e"
    segments = [s for s in path.split("/") if s]
    # ``..;x`` is a dot segment to servers that strip path parameters (Tomcat, Spring).
    if any(s.partition(";")[0] in (".", "..") for s in segments):
        return None
    return "/" + "/".join(segments)


def _already_canonical(raw_path: str) -> bool:
    """No escape, no empty or dot segment, no trailing slash: the common case, answered without
    the cost of splitting the path."""
    return (
        raw_path.startswith("/")
        and not raw_path.endswith("/")
        and "//" not in raw_path
        and "/." not in raw_path
        and "%" not in raw_path
        and "\\" not in raw_path
        and "\x00" not in raw_path
    )


def parse_duration(value: object, where: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    match = _DURATION.match(str(value))
    if not match or float(match.group(1)) <= 0:
        raise ApiConfigError(f"{where}: expected a duration such as 10s, got {value!r}")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2) or "s"]
    return float(match.group(1)) * scale


def _string_list(value: object, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ApiConfigError(f"{where}: expected a list of strings")
    return list(value)


def _mapping(value: object, where: str) -> dict[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiConfigError(f"{where}: expected a mapping")
    return value


def _refuse_unknown_keys(raw: Mapping[Any, Any], known: tuple[str, ...], where: str) -> None:
    """A misspelt key would otherwise be ignored and its setting silently left at the default."""
    for key in raw:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ApiConfigError(f"{where}: unknown key {str(key)!r}{hint}")


def _refuse_unsent_url_parts(url: str, where: str) -> None:
    """Only the scheme, host, port and path of the upstream's URL are used: a query, a fragment
    or credentials in it would be dropped without a word (the project's key is the credential).
    The message never repeats the URL, which may hold a password."""
    try:
        parts = urlsplit(url)
    except ValueError:  # an IPv6 address with a bracket missing: Origin.from_url says so
        return
    unsent = [
        what
        for what, present in (
            ("a query", parts.query or url.endswith("?")),
            ("a fragment", parts.fragment or url.endswith("#")),
            ("a user name or password", "@" in parts.netloc),
        )
        if present
    ]
    if unsent:
        raise ApiConfigError(
            f"{where}: holds {' and '.join(unsent)}, which the proxy never sends upstream;"
            " give scheme://host[:port][/path] only"
        )


def _provider(name: str, raw: object) -> ApiProvider:
    where = f"apis.{name}"
    if not isinstance(raw, dict):
        raise ApiConfigError(f"{where}: expected a mapping")
    _refuse_unknown_keys(raw, PROVIDER_KEYS, where)
    base_url = raw.get("base_url")
    if not isinstance(base_url, str) or not base_url.strip():
        raise ApiConfigError(f"{where}.base_url: expected a URL such as https://api.openai.com")
    # First: the error of a URL that is not http(s) repeats it, password included.
    _refuse_unsent_url_parts(base_url.strip(), f"{where}.base_url")
    try:
        origin = Origin.from_url(base_url.strip())
    except ValueError as exc:
        raise ApiConfigError(f"{where}.base_url: {exc}") from None
    endpoints = _string_list(raw.get("allowed_endpoints"), f"{where}.allowed_endpoints")
    if not endpoints:
        # An empty allowlist would start a proxy that answers every request 404.
        raise ApiConfigError(f"{where}.allowed_endpoints: must list at least one endpoint")
    prefixes = set()
    for endpoint in endpoints:
        normal = normalise_path(endpoint)
        # A request's path is compared without its query, and never as a pattern: an entry
        # holding either would match nothing.
        if normal is None or normal == "/" or any(char in endpoint for char in "*?#"):
            raise ApiConfigError(f"{where}.allowed_endpoints: invalid entry {endpoint!r}")
        prefixes.add(normal)
    timeouts_raw = _mapping(raw.get("timeouts"), f"{where}.timeouts")
    _refuse_unknown_keys(timeouts_raw, TIMEOUT_KEYS, f"{where}.timeouts")
    defaults = Timeouts()
    timeouts = Timeouts(
        **{
            key: parse_duration(timeouts_raw[key], f"{where}.timeouts.{key}")
            if key in timeouts_raw
            else getattr(defaults, key)
            for key in TIMEOUT_KEYS
        }
    )
    whitelist_raw = _mapping(raw.get("param_whitelist"), f"{where}.param_whitelist")
    whitelist: dict[str, tuple[str, ...]] = {}
    for param, patterns in whitelist_raw.items():
        listed = _string_list(patterns, f"{where}.param_whitelist.{param}")
        if not listed:
            # No pattern can match, so the parameter would be refused on every request.
            raise ApiConfigError(f"{where}.param_whitelist.{param}: must list at least one pattern")
        whitelist[str(param)] = tuple(listed)
    inject = raw.get("inject_stream_usage", True)
    if not isinstance(inject, bool):
        raise ApiConfigError(f"{where}.inject_stream_usage: expected true or false")
    return ApiProvider(
        name=name,
        origin=origin,
        allowed_prefixes=frozenset(prefixes),
        allowed_methods=_methods(raw, where),
        timeouts=timeouts,
        param_whitelist=whitelist,
        allowed_origins=_origins(raw, f"{where}.allowed_origins"),
        inject_stream_usage=inject,
    )


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origins(raw: Mapping[str, Any], where: str) -> frozenset[str]:
    """The origins as a browser writes them in its ``Origin`` header (scheme and host lower-case,
    no default port, no trailing slash), which is what they are compared with; an entry no
    browser could send would never match, and is refused."""
    origins = set()
    for entry in _string_list(raw.get("allowed_origins"), where):
        if entry in ("*", "null"):
            origins.add(entry)
            continue
        try:
            parts = urlsplit(entry)
            port = parts.port
        except ValueError:
            parts, port = None, None
        if (
            parts is None
            or "://" not in entry
            or not parts.hostname
            or "@" in parts.netloc
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
            or entry.endswith(("?", "#"))
        ):
            raise ApiConfigError(
                f"{where}: {entry!r} is not an origin (scheme://host[:port], null or *)"
            )
        host = parts.netloc.lower()
        if port is not None and port == _DEFAULT_PORTS.get(parts.scheme):
            host = host.rpartition(":")[0]
        origins.add(f"{parts.scheme}://{host}")
    return frozenset(origins)


def _methods(raw: Mapping[str, Any], where: str) -> frozenset[str]:
    if "allowed_methods" not in raw:
        return frozenset(DEFAULT_METHODS)
    methods = _string_list(raw["allowed_methods"], f"{where}.allowed_methods")
    if not methods:
        raise ApiConfigError(f"{where}.allowed_methods: must list at least one method")
    for method in methods:
        if method.upper() not in STANDARD_METHODS:
            raise ApiConfigError(f"{where}.allowed_methods: unknown HTTP method {method!r}")
    return frozenset(m.upper() for m in methods)


def parse_api_config(raw: object) -> ApiConfig:
    if isinstance(raw, dict):
        _refuse_unknown_keys(raw, TOP_LEVEL_KEYS, "top level")
    if not isinstance(raw, dict) or not isinstance(raw.get("apis"), dict) or not raw["apis"]:
        raise ApiConfigError("apis: expected a mapping with at least one provider")
    providers = {str(name): _provider(str(name), body) for name, body in raw["apis"].items()}
    default_name = str(raw.get("default_api") or next(iter(providers)))
    if default_name not in providers:
        raise ApiConfigError(f"default_api: {default_name!r} is not defined under apis")
    info_path = normalise_path(str(raw.get("token_info_path") or DEFAULT_TOKEN_INFO_PATH))
    if info_path is None or info_path == "/":
        raise ApiConfigError(
            "token_info_path: expected an absolute path such as /v1/llm-proxy/token"
        )
    return ApiConfig(
        default=providers[default_name], providers=providers, token_info_path=info_path
    )


def load_api_config(path: Path) -> ApiConfig:
    try:
        raw = config_yaml.load(path.read_bytes())
    except OSError as exc:
        raise ApiConfigError(f"cannot read {path}: {exc.strerror}") from None
    except DuplicateKeyError as exc:
        raise ApiConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ApiConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_api_config(raw)
