"""``api_providers.yaml`` is read strictly; a mistake stops start-up with one line naming it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llm_proxy.proxy.api_config import ApiConfigError, load_api_config, parse_api_config
from tests.processes import clean_env, cli_command, run

REPOSITORY = Path(__file__).resolve().parents[2]
_DROP = object()  # leaves the key out of the provider


def _provider(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "base_url": "https://api.openai.com",
        "allowed_endpoints": ["/v1/chat/completions"],
    }
    raw.update(overrides)
    return {k: v for k, v in raw.items() if v is not _DROP}


def _refusal(raw: Any) -> str:
    with pytest.raises(ApiConfigError) as caught:
        parse_api_config(raw)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_the_repository_config_loads() -> None:
    config = load_api_config(REPOSITORY / "config" / "api_providers.yaml")
    assert config.default.name == "openai"
    assert config.default.path_allowed("/v1/chat/completions")
    assert config.default.allowed_methods == {"GET", "POST", "DELETE", "OPTIONS"}


def test_a_minimal_provider_gets_the_default_methods() -> None:
    config = parse_api_config({"apis": {"openai": _provider(allowed_methods=_DROP)}})
    assert config.default.allowed_methods == {"GET", "POST", "DELETE", "OPTIONS"}
    config = parse_api_config({"apis": {"openai": _provider(allowed_methods=["get", "PATCH"])}})
    assert config.default.allowed_methods == {"GET", "PATCH"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"apis": {"openai": _provider(allowed_endpoints=_DROP, allowed_endpoint=["/v1"])}},
            "apis.openai: unknown key 'allowed_endpoint' (did you mean 'allowed_endpoints'?)",
        ),
        (
            {"apis": {"openai": _provider(timeout={"connect": "1s"})}},
            "apis.openai: unknown key 'timeout' (did you mean 'timeouts'?)",
        ),
        (
            {"apis": {"openai": _provider(colour="red")}},
            "apis.openai: unknown key 'colour'",
        ),
        (
            {"api": {"openai": _provider()}},
            "top level: unknown key 'api' (did you mean 'apis'?)",
        ),
        (
            {"default_ap": "openai", "apis": {"openai": _provider()}},
            "top level: unknown key 'default_ap' (did you mean 'default_api'?)",
        ),
        (
            {"apis": {"openai": _provider(timeouts={"conect": "1s"})}},
            "apis.openai.timeouts: unknown key 'conect' (did you mean 'connect'?)",
        ),
    ],
)
def test_an_unknown_key_is_named_with_a_suggestion(raw: Any, message: str) -> None:
    assert _refusal(raw) == message


@pytest.mark.parametrize("endpoints", [_DROP, None, []])
def test_an_empty_or_missing_allowlist_is_refused(endpoints: Any) -> None:
    message = _refusal({"apis": {"openai": _provider(allowed_endpoints=endpoints)}})
    assert message == "apis.openai.allowed_endpoints: must list at least one endpoint"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"allowed_methods": ["GET", "FETCH"]},
            "apis.openai.allowed_methods: unknown HTTP method 'FETCH'",
        ),
        (
            {"allowed_methods": []},
            "apis.openai.allowed_methods: must list at least one method",
        ),
        (
            {"base_url": _DROP},
            "apis.openai.base_url: expected a URL such as https://api.openai.com",
        ),
        (
            {"base_url": ""},
            "apis.openai.base_url: expected a URL such as https://api.openai.com",
        ),
        (
            {"base_url": 8080},
            "apis.openai.base_url: expected a URL such as https://api.openai.com",
        ),
        (
            {"base_url": "api.openai.com"},
            "apis.openai.base_url: not an http(s) URL: 'api.openai.com'",
        ),
        (
            # Port 0 is no port to connect to, not the scheme's default one.
            {"base_url": "https://api.openai.com:0"},
            "apis.openai.base_url: port 0 cannot be connected to",
        ),
        (
            # What no browser sends as an Origin would never match: a path, no scheme.
            {"allowed_origins": ["https://app.example/chat"]},
            "apis.openai.allowed_origins: 'https://app.example/chat' is not an origin"
            " (scheme://host[:port], null or *)",
        ),
        (
            {"allowed_origins": ["app.example"]},
            "apis.openai.allowed_origins: 'app.example' is not an origin"
            " (scheme://host[:port], null or *)",
        ),
        (
            # Matched as paths, never as patterns or with a query: these would match nothing.
            {"allowed_endpoints": ["/v1/*"]},
            "apis.openai.allowed_endpoints: invalid entry '/v1/*'",
        ),
        (
            {"allowed_endpoints": ["/v1/models?limit=1"]},
            "apis.openai.allowed_endpoints: invalid entry '/v1/models?limit=1'",
        ),
        (
            {"inject_stream_usage": "yes"},
            "apis.openai.inject_stream_usage: expected true or false",
        ),
        (
            {"param_whitelist": {"model": []}},
            "apis.openai.param_whitelist.model: must list at least one pattern",
        ),
        (
            {"param_whitelist": {"model": None}},
            "apis.openai.param_whitelist.model: must list at least one pattern",
        ),
        (
            {"param_whitelist": ["model"]},
            "apis.openai.param_whitelist: expected a mapping",
        ),
        (
            {"timeouts": ["10s"]},
            "apis.openai.timeouts: expected a mapping",
        ),
    ],
)
def test_a_bad_provider_value_is_named(overrides: dict[str, Any], message: str) -> None:
    assert _refusal({"apis": {"openai": _provider(**overrides)}}) == message


@pytest.mark.process
def test_a_typo_stops_the_server_with_one_line_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "api_providers.yaml"
    config.write_text(
        "apis:\n"
        "  openai:\n"
        "    base_url: https://api.openai.com\n"
        "    allowed_endpoint: [/v1/chat/completions]\n"
    )
    env = clean_env(
        API_CONFIG_PATH=str(config),
        DATA_DIR=str(tmp_path / "data"),
        LISTEN_ADDR="127.0.0.1:0",
        LOG_FORMAT="json",
    )
    result = run(cli_command("server"), env)
    assert result.returncode != 0
    assert result.stderr.splitlines() == [
        "llm-proxy: API_CONFIG_PATH: apis.openai: unknown key 'allowed_endpoint'"
        " (did you mean 'allowed_endpoints'?)"
    ]
    assert not (tmp_path / "data").exists()


@pytest.mark.process
def test_a_key_given_twice_stops_the_server_with_one_line_naming_it(tmp_path: Path) -> None:
    # YAML keeps the last of the two: the first allowlist would be dropped without a word.
    config = tmp_path / "api_providers.yaml"
    config.write_text(
        "apis:\n"
        "  openai:\n"
        "    base_url: https://api.openai.com\n"
        "    allowed_endpoints: [/v1/chat/completions]\n"
        "    allowed_endpoints: [/v1/embeddings]\n"
    )
    env = clean_env(
        API_CONFIG_PATH=str(config),
        DATA_DIR=str(tmp_path / "data"),
        LISTEN_ADDR="127.0.0.1:0",
        LOG_FORMAT="json",
    )
    result = run(cli_command("server"), env)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"llm-proxy: API_CONFIG_PATH: {config}: allowed_endpoints: listed twice (line 5)"
    ]


def test_a_merge_of_shared_settings_is_not_a_key_given_twice(tmp_path: Path) -> None:
    config = tmp_path / "api_providers.yaml"
    config.write_text(
        "apis:\n"
        "  openai: &shared\n"
        "    base_url: https://api.openai.com\n"
        "    allowed_endpoints: [/v1/chat/completions]\n"
        "  other:\n"
        "    <<: *shared\n"
        "    base_url: https://other.example\n"
    )
    providers = load_api_config(config).providers
    assert providers["other"].origin.host == "other.example"
    assert providers["other"].allowed_prefixes == providers["openai"].allowed_prefixes
