"""Model prices: the shipped file, the first-match rule, strict loading, and cost arithmetic."""

from __future__ import annotations

import pickle
from decimal import ROUND_CEILING, Decimal
from pathlib import Path

import pytest

from llm_proxy.pricing import (
    OTHER,
    ModelPrice,
    PriceFile,
    PriceHolder,
    Prices,
    PricesError,
    cost_nanousd,
    load_prices,
    parse_prices,
)

SHIPPED = Path(__file__).parent.parent / "config" / "prices.yaml"


def price(input: str, cached_input: str | None = None, output: str = "0") -> ModelPrice:
    """A price from USD-per-million figures, converted here independently of the loader."""
    nanos = lambda dollars: int(Decimal(dollars) * 10**9)  # noqa: E731
    cached = cached_input if cached_input is not None else input
    return ModelPrice("*", nanos(input), nanos(cached), nanos(output))


def usd_per_million(
    prompt: int, cached: int, completion: int, input: str, cached_input: str, output: str
) -> int:
    """The hand computation: exact decimal dollars, rounded up to a whole nano-dollar."""
    dollars = (
        (prompt - cached) * Decimal(input)
        + cached * Decimal(cached_input)
        + completion * Decimal(output)
    ) / 1_000_000
    return int((dollars * 10**9).to_integral_value(rounding=ROUND_CEILING))


@pytest.fixture(scope="module")
def shipped() -> Prices:
    return load_prices(SHIPPED)


@pytest.mark.parametrize(
    ("model", "pattern", "per_million"),
    [
        ("gpt-5", "gpt-5", ("1.25", "0.125", "10")),
        ("gpt-5-2025-08-07", "gpt-5-*", ("1.25", "0.125", "10")),
        ("gpt-5-mini-2025-08-07", "gpt-5-mini*", ("0.25", "0.025", "2")),
        ("gpt-5-nano", "gpt-5-nano*", ("0.05", "0.005", "0.40")),
        ("gpt-4.1-2025-04-14", "gpt-4.1*", ("2", "0.50", "8")),
        ("gpt-4.1-mini", "gpt-4.1-mini*", ("0.40", "0.10", "1.60")),
        ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano*", ("0.10", "0.025", "0.40")),
        ("gpt-4o", "gpt-4o*", ("2.50", "1.25", "10")),
        ("gpt-4o-2024-08-06", "gpt-4o*", ("2.50", "1.25", "10")),
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13", ("5", "5", "15")),
        ("gpt-4o-mini", "gpt-4o-mini*", ("0.15", "0.075", "0.60")),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini*", ("0.15", "0.075", "0.60")),
        ("gpt-4o-audio-preview", "gpt-4o-audio*", ("40", "40", "80")),
        ("gpt-4o-mini-audio-preview-2024-12-17", "gpt-4o-mini-audio*", ("10", "10", "20")),
        ("o1-2024-12-17", "o1*", ("15", "7.50", "60")),
        ("o1-mini", "o1-mini*", ("1.10", "0.55", "4.40")),
        ("o3", "o3*", ("2", "0.50", "8")),
        ("o3-mini-2025-01-31", "o3-mini*", ("1.10", "0.55", "4.40")),
        ("o4-mini-2025-04-16", "o4-mini*", ("1.10", "0.275", "4.40")),
        ("gpt-4-turbo-2024-04-09", "gpt-4-turbo*", ("10", "10", "30")),
        ("gpt-4-0125-preview", "gpt-4-*-preview", ("10", "10", "30")),
        ("gpt-4", "gpt-4", ("30", "30", "60")),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo*", ("0.50", "0.50", "1.50")),
        ("gpt-3.5-turbo-instruct", "gpt-3.5-turbo-instruct*", ("1.50", "1.50", "2")),
        ("text-embedding-3-small", "text-embedding-3-small", ("0.02", "0.02", "0")),
        ("text-embedding-3-large", "text-embedding-3-large", ("0.13", "0.13", "0")),
        ("text-embedding-ada-002", "text-embedding-ada-002", ("0.10", "0.10", "0")),
        ("omni-moderation-latest", "omni-moderation-*", ("0", "0", "0")),
    ],
)
def test_the_shipped_file_prices_each_model_and_its_snapshots_by_their_family(
    shipped: Prices, model: str, pattern: str, per_million: tuple[str, str, str]
) -> None:
    found = shipped.lookup(model)
    assert found is not None
    expected = ModelPrice(pattern, *(int(Decimal(p) * 10**9) for p in per_million))
    assert (found.pattern, found.input, found.cached_input, found.output) == (
        expected.pattern,
        expected.input,
        expected.cached_input,
        expected.output,
    )
    assert shipped.label(model) == pattern
    # Models that write (not embeddings, not moderations) carry their own output cap, which a
    # budgeted request without one holds.
    assert (found.max_output_tokens is not None) == (found.output > 0)


def test_max_output_tokens_must_be_a_whole_number_of_tokens() -> None:
    assert (
        parse_prices("m: {input: 1, output: 2, max_output_tokens: 64}")[0].max_output_tokens == 64
    )
    for bad in ("0", "1.5", "'many'", "true"):
        with pytest.raises(PricesError, match="max_output_tokens: expected a whole number"):
            parse_prices(f"m: {{input: 1, max_output_tokens: {bad}}}")


def test_reasoning_models_are_marked_and_the_mark_must_be_true_or_false(shipped: Prices) -> None:
    for model in ["o1", "o3-mini", "o4-mini-2025-04-16", "gpt-5", "gpt-5-mini", "gpt-5-codex"]:
        assert shipped.lookup(model).reasoning, model  # type: ignore[union-attr]
    for model in ["gpt-5-chat-latest", "gpt-4o", "gpt-4.1-mini", "gpt-3.5-turbo"]:
        assert not shipped.lookup(model).reasoning, model  # type: ignore[union-attr]
    assert parse_prices("m: {input: 1, reasoning: true}")[0].reasoning
    for bad in ("1", "'yes'", "null"):
        with pytest.raises(PricesError, match="reasoning: expected true or false"):
            parse_prices(f"m: {{input: 1, reasoning: {bad}}}")


@pytest.mark.parametrize(
    "model", ["gpt-5.1", "ft:gpt-4o-mini-2024-07-18:org::abc", "dall-e-3", "whisper-1", "GPT-4O"]
)
def test_models_no_entry_matches_have_no_price_and_the_label_other(
    shipped: Prices, model: str
) -> None:
    assert shipped.lookup(model) is None
    assert shipped.label(model) == OTHER
    assert shipped.cost_nanousd(model, 1000, 0, 1000) is None
    assert shipped.lookup(None) is None and shipped.label(None) == OTHER


def test_the_first_matching_entry_in_file_order_wins() -> None:
    prices = Prices(
        parse_prices(
            "gpt-4o-mini*: {input: 0.15, output: 0.60}\n"
            "gpt-4o-2024-05-13: {input: 5, output: 15}\n"
            "gpt-4o*: {input: 2.50, output: 10}\n"
            "'*': {input: 99}\n"
        )
    )
    assert prices.label("gpt-4o-mini-2024-07-18") == "gpt-4o-mini*"
    assert prices.label("gpt-4o-2024-05-13") == "gpt-4o-2024-05-13"
    assert prices.label("gpt-4o-2024-08-06") == "gpt-4o*"
    assert prices.label("o3") == "*"
    # Looked up once per model name, then remembered: the same answer again.
    assert prices.lookup("gpt-4o") is prices.lookup("gpt-4o")


def test_an_entry_a_broader_glob_above_it_covers_is_refused() -> None:
    with pytest.raises(PricesError) as refused:
        parse_prices(
            "gpt-4o*: {input: 2.50, output: 10}\ngpt-4o-mini*: {input: 0.15, output: 0.60}\n",
            "prices.yaml",
        )
    assert str(refused.value) == (
        "prices.yaml: gpt-4o-mini*: never used: 'gpt-4o*' above it matches every model it does"
        " (the first match wins: put the more specific entry first)"
    )
    with pytest.raises(PricesError, match="gpt-4o-2024-05-13: never used"):
        parse_prices("gpt-4o*: {input: 2.50}\ngpt-4o-2024-05-13: {input: 5}\n")
    with pytest.raises(PricesError, match="o3: never used: '\\*'"):
        parse_prices("'*': {input: 1}\no3: {input: 2}\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "gpt-4o*: {inptu: 2.50, output: 10}\n",
            "prices.yaml: gpt-4o*: unknown key 'inptu' (did you mean 'input'?)",
        ),
        ("gpt-4o*: {input: -1, output: 10}\n", "prices.yaml: gpt-4o*: input: must be a finite"),
        ("gpt-4o*: {input: '2.50'}\n", "prices.yaml: gpt-4o*: input: expected a number"),
        ("gpt-4o*: {input: true}\n", "prices.yaml: gpt-4o*: input: expected a number"),
        ("gpt-4o*: {input: .inf}\n", "prices.yaml: gpt-4o*: input: must be a finite"),
        ("gpt-4o*: {input: 1, output: .nan}\n", "prices.yaml: gpt-4o*: output: must be a finite"),
        (
            "gpt-4o*: {input: 1, output: 1000000.01}\n",
            "prices.yaml: gpt-4o*: output: at most 1,000,000 USD per 1M tokens; got 1000000.01",
        ),
        (
            f"gpt-4o*: {{input: 1{'0' * 400}}}\n",
            "prices.yaml: gpt-4o*: input: at most 1,000,000 USD per 1M tokens; got a huge number",
        ),
        (
            "gpt-4o*: {input: 1, max_output_tokens: 10000001}\n",
            "prices.yaml: gpt-4o*: max_output_tokens: at most 10,000,000 tokens; got 10000001",
        ),
        (
            f"gpt-4o*: {{input: 1, max_output_tokens: 1{'0' * 400}}}\n",
            "prices.yaml: gpt-4o*: max_output_tokens: at most 10,000,000 tokens; got a huge number",
        ),
        ("gpt-4o*: {output: 10}\n", "prices.yaml: gpt-4o*: input: missing"),
        ("gpt-4o*: 2.50\n", "prices.yaml: gpt-4o*: expected {input, cached_input, output}"),
        ("1: {input: 1}\n", "prices.yaml: 1: a model glob must be a non-empty string"),
        ("- gpt-4o\n", "prices.yaml: expected a mapping of model globs to prices"),
        ("", "prices.yaml: expected a mapping of model globs to prices"),
        ("o3: {input: 2}\no3: {input: 3}\n", "prices.yaml: o3: listed twice (line 2)"),
        ("o3: {input: [\n", "prices.yaml is not valid YAML: "),
    ],
)
def test_a_bad_file_is_refused_with_one_line_naming_the_file_and_entry(
    text: str, message: str
) -> None:
    with pytest.raises(PricesError) as refused:
        parse_prices(text, "prices.yaml")
    assert str(refused.value).startswith(message)
    assert "\n" not in str(refused.value)


def test_a_price_may_be_up_to_a_million_dollars_per_million_tokens() -> None:
    (entry,) = parse_prices("m: {input: 1000000, output: 1000000.0}")
    assert entry.input == entry.output == 1_000_000 * 10**9  # nano-dollars per million tokens


def test_reading_the_file_refuses_a_missing_one_unless_optional(tmp_path: Path) -> None:
    missing = tmp_path / "prices.yaml"
    with pytest.raises(PricesError, match=f"cannot read {missing}: no such file"):
        load_prices(missing)
    assert load_prices(missing, optional=True).entries == ()
    with pytest.raises(PricesError, match="cannot read"):
        load_prices(tmp_path)  # a directory
    missing.write_text("{}\n")
    assert load_prices(missing).entries == ()  # an empty price list: nothing is priced


def test_cached_prompt_tokens_are_priced_at_the_cached_rate() -> None:
    gpt_4o = price("2.50", "1.25", "10")
    # 1,000 prompt tokens of which 600 cached, 200 completion tokens:
    # 400 x $2.50/M + 600 x $1.25/M + 200 x $10/M = $0.001 + $0.00075 + $0.002
    assert cost_nanousd(gpt_4o, 1000, 600, 200) == 3_750_000
    assert cost_nanousd(gpt_4o, 1000, 600, 200) == usd_per_million(
        1000, 600, 200, "2.50", "1.25", "10"
    )
    assert cost_nanousd(gpt_4o, 1000, 0, 200) == 4_500_000
    # Cached tokens are part of the prompt: never more of them than prompt tokens.
    assert cost_nanousd(gpt_4o, 10, 50, 0) == cost_nanousd(gpt_4o, 10, 10, 0)
    assert cost_nanousd(gpt_4o, -5, -1, -3) == 0


def test_costs_are_rounded_up_to_a_whole_nano_dollar() -> None:
    # $1 per million tokens is 1,000 nano-dollars a token: a price with more than three decimals
    # leaves fractions. 3 tokens x $0.0015/M = 4.5 nano-dollars: 5, never down to 4.
    assert cost_nanousd(price("0.0015"), 3, 0, 0) == 5
    assert cost_nanousd(price("0.0015"), 2, 0, 0) == 3  # exactly 3
    assert cost_nanousd(price("0.0001"), 1, 0, 0) == 1  # a tenth of a nano-dollar is not free
    assert cost_nanousd(price("0.0001"), 0, 0, 0) == 0
    # 7 x $0.15/M + 11 x $0.60/M = 1,050 + 6,600 nano-dollars.
    assert cost_nanousd(price("0.15", "0.075", "0.60"), 7, 0, 11) == 7_650
    assert cost_nanousd(price("0.15", "0.075", "0.60"), 7, 3, 11) == usd_per_million(
        7, 3, 11, "0.15", "0.075", "0.60"
    )
    assert cost_nanousd(price("0.15", "0.075", "0.60"), 7, 3, 11) == 7_425  # 600 + 225 + 6,600


def test_prices_cross_into_the_events_process_and_reload_from_their_file(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text("gpt-4o*: {input: 2.50, output: 10}\n")
    holder = PriceHolder(PriceFile(path).load())
    copy = pickle.loads(pickle.dumps(holder.current))
    assert copy.entries == holder.current.entries and copy.source == PriceFile(path)
    assert copy.label("gpt-4o") == "gpt-4o*"

    path.write_text("gpt-4o*: {input: 5, output: 20}\n")
    assert holder.reload().lookup("gpt-4o") == ModelPrice(
        "gpt-4o*", 5 * 10**9, 5 * 10**9, 20 * 10**9
    )
    path.write_text("gpt-4o*: {input: five}\n")
    with pytest.raises(PricesError):
        holder.reload()
    assert holder.current.lookup("gpt-4o") == ModelPrice(
        "gpt-4o*", 5 * 10**9, 5 * 10**9, 20 * 10**9
    )  # the prices in force stay
    assert PriceHolder(Prices()).reload().entries == ()  # no file: nothing to read again


def test_entries_may_share_prices_through_a_yaml_merge() -> None:
    entries = parse_prices(
        "gpt-4o-mini*: &mini {input: 0.15, output: 0.6}\no4-mini: {<<: *mini, output: 1}\n"
    )
    assert (entries[1].input, entries[1].output) == (entries[0].input, 10**9)
