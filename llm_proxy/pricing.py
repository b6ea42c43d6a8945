"""Model prices (``config/prices.yaml``) and what a request's tokens cost.

The file maps a model glob to ``{input, cached_input, output}`` in US dollars per million tokens.
A model takes the price of the **first** entry, in file order, whose glob matches it
(``fnmatch``, case-sensitive), so a specific entry goes above the family it belongs to:
``gpt-4o-mini*`` before ``gpt-4o*``. An entry that an earlier ``prefix*`` glob already covers
whole could never match, and is refused at load rather than silently ignored.

Money is kept in integer nano-dollars (:mod:`llm_proxy.models`): a price becomes nano-dollars per
million tokens, and a cost is rounded up to a whole nano-dollar, so sums are exact and never below
what the upstream bills.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llm_proxy import config_yaml
from llm_proxy.config_yaml import DuplicateKeyError
from llm_proxy.models import nanousd

ENTRY_KEYS = ("input", "cached_input", "output")
LIMIT_KEYS = ("max_output_tokens",)
FLAG_KEYS = ("reasoning",)
TOKENS_PER_PRICE = 1_000_000  # prices are per million tokens
# The most a price may be, in USD per million tokens ($1 a token; the dearest model listed costs
# hundreds): beyond it a figure is a typo, and its nano-dollars would not fit the store's columns.
MAX_USD_PER_MILLION = 1_000_000
# The most a model's max_output_tokens may be (the largest models write 128,000 at most): beyond
# it a figure is a typo, and a hold priced from it would not fit the store's columns.
MAX_OUTPUT_TOKENS = 10_000_000
OTHER = "other"  # the metrics label of a model no entry prices
_WILDCARDS = re.compile(r"[*?\[]")
# Model names come from clients: remember a bounded number of them, and only names as long as
# a model's get (a client's may run to the whole captured body, in every event).
_CACHE_LIMIT = 4096
_CACHED_NAME_LENGTH = 256


class PricesError(ValueError):
    """The prices file is unusable; the one-line message names the file and the entry."""


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One entry of the prices file, in nano-dollars per million tokens."""

    pattern: str  # the glob as configured; also the model label of metrics
    input: int
    cached_input: int
    output: int
    # The most output tokens the model produces for one answer, when known: a budgeted request
    # without an output cap reserves this much output, and gets a cap only when its budget
    # affords less (a cap above the model's own is refused by the upstream).
    max_output_tokens: int | None = None
    # The model thinks in hidden tokens, billed as output, before it writes: a stream cut before
    # its usage came shows only the words, not what the upstream billed for them.
    reasoning: bool = False


def cost_nanousd(
    price: ModelPrice, prompt_tokens: int, cached_prompt_tokens: int, completion_tokens: int
) -> int:
    """What a request cost, in nano-dollars, rounded up.

    Cached tokens are part of the prompt tokens (as OpenAI reports them: ``prompt_tokens_details``
    / ``input_tokens_details.cached_tokens``) and are priced at ``cached_input``; the rest of the
    prompt at ``input``.
    """
    prompt = max(prompt_tokens, 0)
    cached = min(max(cached_prompt_tokens, 0), prompt)
    scaled = (
        (prompt - cached) * price.input
        + cached * price.cached_input
        + max(completion_tokens, 0) * price.output
    )
    return -(-scaled // TOKENS_PER_PRICE)


@dataclass(frozen=True, slots=True)
class PriceFile:
    """Where prices come from, so that they can be read again (SIGHUP)."""

    path: Path
    optional: bool = False  # a missing file means no prices rather than an error

    def load(self) -> Prices:
        """Read and check the file; raises :class:`PricesError`."""
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            if self.optional:
                return Prices((), source=self)
            raise PricesError(f"cannot read {self.path}: no such file") from None
        except OSError as exc:
            raise PricesError(f"cannot read {self.path}: {exc.strerror}") from None
        return Prices(parse_prices(text, str(self.path)), source=self)


class Prices:
    """The entries of a prices file, and the price of a model (looked up once per model name)."""

    __slots__ = ("_cache", "_matchers", "entries", "source")

    def __init__(
        self, entries: Sequence[ModelPrice] = (), *, source: PriceFile | None = None
    ) -> None:
        self.entries = tuple(entries)
        self.source = source
        self._matchers: tuple[tuple[Callable[[str], object], ModelPrice], ...] = tuple(
            (re.compile(fnmatch.translate(e.pattern)).match, e) for e in self.entries
        )
        self._cache: dict[str, ModelPrice | None] = {}

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled into the events process's launch record: entries and source, not the caches.
        return (_rebuild, (self.entries, self.source))

    def __repr__(self) -> str:
        where = self.source.path if self.source else None
        return f"Prices({len(self.entries)} entries from {where})"

    def lookup(self, model: str | None) -> ModelPrice | None:
        """The price of ``model``: the first entry whose glob matches, or None (not priced)."""
        if not model:
            return None
        cache = self._cache
        try:
            return cache[model]
        except KeyError:
            pass
        price = next((entry for match, entry in self._matchers if match(model)), None)
        if len(model) > _CACHED_NAME_LENGTH:
            return price
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        cache[model] = price
        return price

    def label(self, model: str | None) -> str:
        """The bounded model label of metrics: the matching glob as configured, or ``other``."""
        price = self.lookup(model)
        return price.pattern if price is not None else OTHER

    def cost_nanousd(
        self,
        model: str | None,
        prompt_tokens: int,
        cached_prompt_tokens: int,
        completion_tokens: int,
    ) -> int | None:
        """What ``model``'s tokens cost, or None when the model has no price."""
        price = self.lookup(model)
        if price is None:
            return None
        return cost_nanousd(price, prompt_tokens, cached_prompt_tokens, completion_tokens)


def _rebuild(entries: tuple[ModelPrice, ...], source: PriceFile | None) -> Prices:
    return Prices(entries, source=source)


class PriceHolder:
    """The prices in force, swapped whole on reload: readers take ``.current`` once per use.

    A request is held and capped at the prices in force when it goes upstream; one still running
    at a reload is priced as it was held (``in_force_at``), or a price raised meanwhile would
    settle it past its hold, and its token past its budget."""

    __slots__ = ("_before", "current")

    def __init__(self, prices: Prices) -> None:
        self.current = prices
        # When the last reload happened (time.perf_counter(), one clock for every process of the
        # machine) and the prices it replaced.
        self._before: tuple[float, Prices] | None = None

    def reload(self) -> Prices:
        """Read the file again; on :class:`PricesError` the prices in force stay."""
        source = self.current.source
        if source is not None:
            loaded = source.load()
            self._before = (time.perf_counter(), self.current)
            self.current = loaded
        return self.current

    def in_force_at(self, moment: float) -> Prices:
        """The prices in force at ``moment`` (a time.perf_counter() value, 0 for unknown): those
        the last reload replaced when it came later, else the current ones."""
        before = self._before
        if before is not None and 0 < moment < before[0]:
            return before[1]
        return self.current


def parse_prices(text: str | bytes, where: str = "prices") -> list[ModelPrice]:
    """The entries of a prices file's text, in file order; ``where`` names it in errors."""
    try:
        raw = config_yaml.load(text)
    except DuplicateKeyError as exc:
        raise PricesError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        raise PricesError(f"{where} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise PricesError(f"{where}: expected a mapping of model globs to prices")
    entries: list[ModelPrice] = []
    for pattern, body in raw.items():
        entry = _entry(pattern, body, where)
        _refuse_shadowed(entry.pattern, entries, where)
        entries.append(entry)
    return entries


def _entry(pattern: object, body: object, where: str) -> ModelPrice:
    if not isinstance(pattern, str) or not pattern.strip():
        raise PricesError(f"{where}: {pattern!r}: a model glob must be a non-empty string")
    at = f"{where}: {pattern}"
    if not isinstance(body, dict):
        raise PricesError(f"{at}: expected {{input, cached_input, output}} in USD per 1M tokens")
    for key in body:
        if key not in ENTRY_KEYS and key not in LIMIT_KEYS and key not in FLAG_KEYS:
            close = difflib.get_close_matches(str(key), ENTRY_KEYS + LIMIT_KEYS + FLAG_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PricesError(f"{at}: unknown key {str(key)!r}{hint}")
    if "input" not in body:
        raise PricesError(f"{at}: input: missing (USD per 1M prompt tokens)")
    price = {key: _dollars(body[key], f"{at}: {key}") for key in ENTRY_KEYS if key in body}
    return ModelPrice(
        pattern=pattern,
        input=price["input"],
        # No separate cached price: cached tokens cost what the others do.
        cached_input=price.get("cached_input", price["input"]),
        output=price.get("output", 0),  # embeddings and moderations produce no output tokens
        max_output_tokens=_tokens(body["max_output_tokens"], f"{at}: max_output_tokens")
        if "max_output_tokens" in body
        else None,
        reasoning=_flag(body.get("reasoning", False), f"{at}: reasoning"),
    )


def _flag(value: object, at: str) -> bool:
    if not isinstance(value, bool):
        raise PricesError(f"{at}: expected true or false; got {value!r}")
    return value


def _tokens(value: object, at: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PricesError(f"{at}: expected a whole number of tokens, at least 1; got {value!r}")
    if value > MAX_OUTPUT_TOKENS:
        shown = repr(value) if value < 10**21 else "a huge number"
        raise PricesError(f"{at}: at most {MAX_OUTPUT_TOKENS:,} tokens; got {shown}")
    return value


def _dollars(value: object, at: str) -> int:
    """USD per million tokens as nano-dollars per million tokens."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PricesError(f"{at}: expected a number of USD per 1M tokens, got {value!r}")
    if (isinstance(value, float) and not math.isfinite(value)) or value < 0:
        raise PricesError(f"{at}: must be a finite number, not negative; got {value!r}")
    if value > MAX_USD_PER_MILLION:
        # (A YAML integer is unbounded: hundreds of digits would not make a line.)
        shown = repr(value) if isinstance(value, float) or value < 10**21 else "a huge number"
        raise PricesError(f"{at}: at most {MAX_USD_PER_MILLION:,} USD per 1M tokens; got {shown}")
    return nanousd(value)


def _refuse_shadowed(pattern: str, earlier: list[ModelPrice], where: str) -> None:
    """An entry that an earlier ``prefix*`` glob covers whole would never be used."""
    cut = _WILDCARDS.search(pattern)
    literal = pattern[: cut.start()] if cut else pattern
    for entry in earlier:
        prefix = entry.pattern[:-1]
        if (
            entry.pattern.endswith("*")
            and not _WILDCARDS.search(prefix)
            and literal.startswith(prefix)
        ):
            raise PricesError(
                f"{where}: {pattern}: never used: {entry.pattern!r} above it matches every"
                " model it does (the first match wins: put the more specific entry first)"
            )


def load_prices(path: Path, *, optional: bool = False) -> Prices:
    """The prices of ``path``; raises :class:`PricesError` with a one-line message."""
    return PriceFile(path, optional).load()
