"""How keys are shown (enough to recognise one, never more than a third of it) and credentials compared."""

from __future__ import annotations

import pytest

from llm_proxy.crypto import mask_key, redact, secrets_match


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        ("sk-proj-" + "a1B2c3D4" * 20 + "wxyz", "sk-pr…wxyz"),  # SPEC §5's form for real keys
        ("sk-abcdefghijklmnopqrstuvwx", "sk-ab…uvwx"),  # 27 characters: 9 shown
        ("sk-abcdefghijklmnopqrstuvw", "sk-a…tuvw"),
        ("sk-new-key-0000abcd", "sk…abcd"),
        ("sk-abcdefghij", "…ghij"),
        ("abcdef", "…ef"),
        ("abc", "…c"),
        ("ab", "…"),
        ("", "…"),
    ],
)
def test_a_masked_key_shows_at_most_a_third_of_it(key: str, shown: str) -> None:
    assert mask_key(key) == shown
    assert len(shown) - 1 <= len(key) // 3


@pytest.mark.parametrize("length", range(1, 80))
def test_no_key_length_shows_more_than_a_third(length: int) -> None:
    key = "".join(chr(ord("a") + i % 26) for i in range(length))
    masked = mask_key(key)
    head, _, tail = masked.partition("…")
    assert len(head) + len(tail) <= length // 3
    assert key.startswith(head) and key.endswith(tail)


def test_a_short_key_shaped_secret_in_a_log_line_is_masked_to_a_third() -> None:
    line = redact("refused key sk-abcdefgh12 for project p")
    assert line == "refused key …gh12 for project p"


@pytest.mark.parametrize(
    ("given", "expected", "matches"),
    [
        (b"s3cret-password", b"s3cret-password", True),
        (b"s3cret-passwore", b"s3cret-password", False),
        (b"s3cret", b"s3cret-password", False),
        (b"s3cret-password-and-more", b"s3cret-password", False),
        (b"", b"s3cret-password", False),
        (b"", b"", True),
    ],
)
def test_a_credential_matches_only_the_secret_itself(
    given: bytes, expected: bytes, matches: bool
) -> None:
    assert secrets_match(given, expected) is matches
