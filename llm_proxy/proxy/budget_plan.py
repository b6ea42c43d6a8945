"""What a request on a budgeted token may cost, from its body, before it goes upstream.

The most a request can cost is its prompt (counted offline, an upper bound) at the input price
plus its output cap at the output price, times the answers it asks for (``n``, ``best_of``). A
request that sets no cap gets the model's own (``max_output_tokens`` in ``prices.yaml``) or, when
the budget affords less, the cap it affords, written into the body: so no answer, streamed or not,
can cost more than was held for it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from llm_proxy import errors
from llm_proxy.pricing import TOKENS_PER_PRICE, ModelPrice, Prices
from llm_proxy.proxy.cost_bound import CAP_FIELDS, HONOURED_CAPS, OUTPUT_CAP_FIELDS
from llm_proxy.proxy.quoting import quoted

# Top-level fields of a body that bear on its cost.
COST_FIELDS = frozenset({"model", *CAP_FIELDS, "n", "best_of", "service_tier"})
# Processing tiers billed at prices.yaml's (Standard) prices or below: Priority costs up to twice
# as much, and Scale is paid for apart, so a request asking for either is not priced by the file.
_LISTED_TIERS = frozenset({None, "auto", "default", "flex"})
# Endpoints whose JSON bodies may name no model: they run none (a stored completion's update, a
# cancel) or only a free one (moderations). Anywhere else a body without one may run the upstream's
# default, which has no price here: image generation runs dall-e-2 (gpt-image-1 when the body sets
# one of its parameters), a thread run or a batch the models named elsewhere.
_NO_MODEL_NEEDED = re.compile(
    r"/v1/moderations|/v1/chat/completions/[^/]+|/v1/responses/[^/]+/cancel"
)
# Endpoints that bill nothing whatever model they name: counting a Responses request's input runs
# no model and writes no output, so there is no cap to set and nothing to hold.
_FREE_WITH_ANY_MODEL = frozenset({"/v1/responses/input_tokens"})
# The smallest cap the proxy adds (the Responses API refuses max_output_tokens below 16).
MIN_OUTPUT_CAP = 16
# What a hold asks for when only the budget bounds it: all there is.
_EVERYTHING = 2**62


@dataclass(slots=True)
class CostPlan:
    """A request's cost bounds in nano-dollars, and how to cap its output once held."""

    want: int  # the most it can cost (hold this much when the budget has it)
    minimum: int  # the least that admits it: prompt plus the smallest cap it may be given
    prompt_cost: int  # the prompt's bound at the input price
    output_unit: int  # nano-dollars per million output tokens, times the answers asked for
    cap_field: str | None  # the field to add when the hold affords less than ``want``
    model_cap: int | None  # the model's own output cap (no field needed up to it)
    cap_field_null: bool = False  # the body has ``cap_field`` already, as null

    def cap_for(self, held: int) -> int | None:
        """The output cap to write into the body for a hold of ``held``, or None for none."""
        if self.cap_field is None or self.output_unit == 0:
            return None
        affordable = (held - self.prompt_cost) * TOKENS_PER_PRICE // self.output_unit
        if self.model_cap is not None and affordable >= self.model_cap:
            return None  # the model stops there by itself
        return affordable


def _ints(values: Sequence[object], name: str) -> list[int]:
    numbers = []
    for value in values:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise errors.MalformedRequest(f"'{name}' must be a whole number.")
        numbers.append(int(value))
    return numbers


def _caps(values: dict[str, list[object]], honoured: tuple[str, ...]) -> list[int]:
    """Every output cap the body gives in a cap field its endpoint reads (``honoured``); null is
    none. A cap in another field bounds nothing: an upstream that does not refuse the field ignores
    it (text-to-speech has no output cap at all).

    Only a JSON integer of at least 1 bounds the output: an upstream may read 0, a negative number
    (llama.cpp: -1 for no limit) or a fraction (100.0) as no cap at all, so they are refused rather
    than held as a bound the upstream may ignore. So is a key given both as null and as a number,
    which a parser keeping the null would read as no cap.
    """
    caps: list[int] = []
    for field in CAP_FIELDS:
        given = values.get(field, [])
        for value in given:
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise errors.MalformedRequest(f"'{field}' must be an integer from 1 to 2**64-1.")
            if field in honoured:
                caps.append(value)
        if None in given and any(value is not None for value in given):
            raise errors.MalformedRequest(f"'{field}' is given twice, as null and as a number.")
    return caps


def plan_cost(
    path: str, values: dict[str, list[object]], prices: Prices, prompt_tokens: int
) -> CostPlan | None:
    """The cost plan of a JSON body's top-level ``values``; None when it names no model and the
    endpoint runs none (or only a free one). Raises ``model_not_priced`` for what
    cannot be priced or bounded."""
    if path in _FREE_WITH_ANY_MODEL:
        return None
    models = values.get("model") or []
    if not models:
        if _NO_MODEL_NEEDED.fullmatch(path) is None:
            raise errors.ModelNotPriced(
                "This token has a budget; a request to this endpoint must name a priced model."
            )
        return None
    price = _price_of(models, prices)
    for tier in values.get("service_tier", []):
        if not (tier is None or isinstance(tier, str)) or tier not in _LISTED_TIERS:
            raise errors.ModelNotPriced(
                "This token has a budget; prices.yaml lists Standard processing prices, so"
                " 'service_tier' may only be auto, default or flex."
            )
    choices = max(
        [1, *_ints(values.get("n", []), "n"), *_ints(values.get("best_of", []), "best_of")]
    )
    caps = _caps(values, HONOURED_CAPS.get(path, ()))
    output_unit = price.output * choices
    prompt_cost = -(-prompt_tokens * price.input // TOKENS_PER_PRICE)
    if caps:
        # Every occurrence counts: with a repeated key, upstream parsers keep one or the other.
        cost = prompt_cost + -(-max(caps) * output_unit // TOKENS_PER_PRICE)
        return CostPlan(cost, cost, prompt_cost, output_unit, None, None)
    if output_unit == 0:
        return CostPlan(prompt_cost, prompt_cost, prompt_cost, 0, None, None)
    field = OUTPUT_CAP_FIELDS.get(path)
    if field is None:
        raise errors.ModelNotPriced(
            "This token has a budget, and the output of this request has no cap the proxy can"
            " set; send one (max_tokens)."
        )
    smallest = prompt_cost + -(-MIN_OUTPUT_CAP * output_unit // TOKENS_PER_PRICE)
    model_cap = price.max_output_tokens
    want = (
        prompt_cost + -(-model_cap * output_unit // TOKENS_PER_PRICE)
        if model_cap is not None
        else _EVERYTHING
    )
    # A null cap is none: the proxy adds its own, where no parser can prefer the null (see
    # `with_output_cap`).
    null = bool(values.get(field))
    return CostPlan(want, min(smallest, want), prompt_cost, output_unit, field, model_cap, null)


def _price_of(models: Sequence[object], prices: Prices) -> ModelPrice:
    """The price of the body's model; of the dearest, when a repeated key names several."""
    found = []
    for model in models:
        price = prices.lookup(model) if isinstance(model, str) else None
        if price is None:
            raise errors.ModelNotPriced(
                f"This token has a budget and model {quoted(model)} has no price in prices.yaml."
            )
        found.append(price)
    if len(found) == 1:
        return found[0]
    caps = [p.max_output_tokens for p in found]
    return ModelPrice(
        found[0].pattern,
        input=max(p.input for p in found),
        cached_input=max(p.cached_input for p in found),
        output=max(p.output for p in found),
        max_output_tokens=None if None in caps else max(c for c in caps if c is not None),
        reasoning=any(p.reasoning for p in found),
    )
