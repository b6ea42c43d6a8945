"""``api_providers.yaml``: the upstream, its allowlist, timeouts, parameter whitelist and CORS.

Path checks run on every request, so the allowlist is compiled into a set of allowed prefixes and a
request path is matched by walking its segment boundaries (O(segments), no regex).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import yaml

from llm_proxy.upstream import Origin, Timeouts

DEFAULT_METHODS = ("GET", "POST", "DELETE", "OPTIONS")
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

    Encoded slashes and backslashes, dot segments (also percent-encoded) and NUL bytes are refused
    rather than resolved: a client has no honest reason to send them, and resolving them is how
    prefix allowlists get bypassed. Repeated slashes collapse and a trailing slash is dropped.
    """
    if _already_canonical(raw_path):
        return raw_path
    lowered = raw_path.lower()
    if "%2f" in lowered or "%5c" in lowered or "\\" in raw_path or "%00" in lowered:
        return None
    path = unquote(raw_path) if "%" in raw_path else raw_path
    if not path.startswith("/") or "\x00" in path:
        return None
    segments = [s for s in path.split("/") if s]
    if any(s in (".", "..") for s in segments):
        return None
    return "/" + "/".join(segments)


def _already_canonical(raw_path: str) -> bool:
    """No escape, no empty or dot segment, no trailing slash: the common case, answered without
    splitting the path (1.0 → 0.2 µs)."""
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


def _provider(name: str, raw: object) -> ApiProvider:
    where = f"apis.{name}"
    if not isinstance(raw, dict):
        raise ApiConfigError(f"{where}: expected a mapping")
    try:
        origin = Origin.from_url(str(raw.get("base_url", "")))
    except ValueError as exc:
        raise ApiConfigError(f"{where}.base_url: {exc}") from None
    endpoints = _string_list(raw.get("allowed_endpoints"), f"{where}.allowed_endpoints")
    prefixes = set()
    for endpoint in endpoints:
        normal = normalise_path(endpoint)
        if normal is None or normal == "/":
            raise ApiConfigError(f"{where}.allowed_endpoints: invalid entry {endpoint!r}")
        prefixes.add(normal)
    methods = _string_list(raw.get("allowed_methods"), f"{where}.allowed_methods") or list(
        DEFAULT_METHODS
    )
    timeouts_raw = raw.get("timeouts") or {}
    if not isinstance(timeouts_raw, dict):
        raise ApiConfigError(f"{where}.timeouts: expected a mapping")
    unknown = set(timeouts_raw) - {"connect", "response_header", "idle"}
    if unknown:
        raise ApiConfigError(f"{where}.timeouts: unknown key {sorted(unknown)[0]!r}")
    defaults = Timeouts()
    timeouts = Timeouts(
        **{
            key: parse_duration(timeouts_raw[key], f"{where}.timeouts.{key}")
            if key in timeouts_raw
            else getattr(defaults, key)
            for key in ("connect", "response_header", "idle")
        }
    )
    whitelist_raw = raw.get("param_whitelist") or {}
    if not isinstance(whitelist_raw, dict):
        raise ApiConfigError(f"{where}.param_whitelist: expected a mapping")
    whitelist = {
        str(param): tuple(_string_list(patterns, f"{where}.param_whitelist.{param}"))
        for param, patterns in whitelist_raw.items()
    }
    inject = raw.get("inject_stream_usage", True)
    if not isinstance(inject, bool):
        raise ApiConfigError(f"{where}.inject_stream_usage: expected true or false")
    return ApiProvider(
        name=name,
        origin=origin,
        allowed_prefixes=frozenset(prefixes),
        allowed_methods=frozenset(m.upper() for m in methods),
        timeouts=timeouts,
        param_whitelist=whitelist,
        allowed_origins=frozenset(
            _string_list(raw.get("allowed_origins"), f"{where}.allowed_origins")
        ),
        inject_stream_usage=inject,
    )


def parse_api_config(raw: object) -> ApiConfig:
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
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ApiConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ApiConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_api_config(raw)
