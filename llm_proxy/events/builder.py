"""Build the instrumentation event for one finished :class:`~llm_proxy.proxy.exchange.Exchange`.

Runs in the event pipeline's worker thread, never on the request path: this is where bodies are
decompressed, parsed, streams reassembled and tokens counted.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from llm_proxy.events import bodies, sse, usage
from llm_proxy.events.courtesy import courteously
from llm_proxy.events.event import Event, Usage, rfc3339
from llm_proxy.events.form_model import multipart_model
from llm_proxy.events.reassemble import reassemble
from llm_proxy.models import usd
from llm_proxy.pricing import Prices, cost_nanousd
from llm_proxy.proxy.cost_bound import HONOURED_CAPS
from llm_proxy.proxy.exchange import RESPONSE_TAIL_BYTES, Exchange

# Event ids are unique, not secret: version-4 UUIDs from a PRNG seeded by the OS, instead of an
# os.urandom system call per event (a quarter of an event's build time).
_random = random.Random()
_VERSION_4 = (0x4000 << 64) | (0x8000 << 48)
_VERSION_MASK = ~((0xF000 << 64) | (0xC000 << 48))
_CLIENT_CLOSED = 499


def event_id() -> str:
    """A random (version 4) UUID in its canonical text form."""
    h = f"{_random.getrandbits(128) & _VERSION_MASK | _VERSION_4:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def shown_request_id(exchange: Exchange) -> str:
    """The event's ``request_id``: the client's X-Request-ID when it sent one, which may be a
    token it filled in by mistake, so masked like every other field an event shows."""
    return bodies.text_without_secrets(exchange.request_id)


def _ms(start: float, end: float) -> float:
    # Whole microseconds, as milliseconds: round(x, 3) formats and parses decimal digits.
    return round((end - start) * 1_000_000.0) / 1000.0


def build(
    exchange: Exchange,
    *,
    prices: Prices | None = None,
    decoded_limit: int = bodies.DEFAULT_DECODED_LIMIT,
) -> Event:
    """The event of ``exchange``; ``prices`` give its ``cost_usd`` (None: no model is priced)."""
    request_model = None
    if exchange.request_bytes_shed:
        request: object = bodies.shed_note(exchange.request_bytes_shed)
        shown_request = request
    else:
        request_raw = exchange.request_body.getvalue()
        truncated = exchange.request_body.truncated
        request = bodies.show(bodies.Decoded(request_raw, truncated), 0)
        request_model = _model(request) or multipart_model(request_raw)
        # Priced and counted as sent; shown with any key it holds masked.
        masked = bodies.without_secrets(request_raw)
        shown_request = (
            request if masked is request_raw else bodies.show(bodies.Decoded(masked, truncated), 0)
        )

    response_raw = exchange.response_body.getvalue()
    decoded = bodies.decode(
        response_raw,
        exchange.response_content_encoding,
        truncated=exchange.response_body.truncated,
        limit=decoded_limit,
    )
    if decoded.data is not None:
        # The project's key first: a start of it that ends a cut body is masked whole, where the
        # masking of key-shaped text would show the last characters before the cut.
        decoded.data = bodies.without_secrets(
            bodies.without_key(decoded.data, exchange.upstream_key_to_mask)
        )
    if exchange.is_stream and decoded.data is not None:
        response = reassemble(sse.payloads(decoded.data))
        # Its text when it is too deep, or when no event held a JSON object (nothing to show).
        if response == [] or not bodies.shallow(response, decoded.data):
            response = bodies.show(decoded, len(response_raw))
    else:
        response = bodies.show(decoded, len(response_raw))

    model = request_model or _model(response)
    # Only a POST generates: a GET or DELETE of a stored response or completion, or a POST that
    # cancels or updates one, shows the usage of the request that made it, already counted. A
    # background response still being produced has no tokens to show yet (it pays all it held,
    # the most it can cost).
    generated = exchange.method == "POST" and not _STORED_OBJECT.search(exchange.path)
    event_usage: Usage | None = None
    usage_body = response
    if generated and not _in_background(request, response):
        event_usage, usage_body = _answer_usage(
            exchange, request, response, decoded, response_raw, model
        )
    answered = generated and 200 <= exchange.status < 300
    cost_usd = _cost_usd(prices, model, event_usage, usage_body, answered)
    left_early = answer_unseen(exchange, event_usage, reasons(prices, model))
    if left_early and exchange.held_nanousd:
        # All it held, the most the unseen answer cost; its usage says what that paid for.
        cost_usd = usd(exchange.held_nanousd)
        event_usage = _usage_held(prices, model, event_usage, exchange.held_nanousd)
    elif cost_usd is None and answered and exchange.held_nanousd and _priced(prices, model):
        # A priced answer whose tokens are unknown (a background response still running, a
        # compressed answer longer than the capture) is charged all it held (settlement.py): the
        # event says so, or the usage summed from events would miss what the budget paid.
        cost_usd = usd(exchange.held_nanousd)

    stream = exchange.is_stream
    if not exchange.response_content_type and isinstance(request, dict):
        stream = request.get("stream") is True  # no answer came: report what was asked for

    # A dict display: calling the TypedDict passes eighteen keyword arguments.
    event: Event = {
        "id": event_id(),
        "request_id": shown_request_id(exchange),
        "timestamp": rfc3339(exchange.started_at),
        "project_id": exchange.project_id,
        "token_id": exchange.token_id,
        "method": exchange.method,
        "path": bodies.path_without_secrets(exchange.path),
        # No answer went out: 499 when the client closed the connection first (nginx's code).
        "status": exchange.status or (_CLIENT_CLOSED if exchange.left_by_client else 0),
        "duration_ms": _ms(exchange.started, exchange.ended) if exchange.ended else 0.0,
        "ttfb_ms": _ms(exchange.started, exchange.first_byte_at)
        if exchange.first_byte_at
        else None,
        "stream": stream,
        "model": bodies.text_without_secrets(model) if model else model,
        "request": shown_request,
        "response": response,
        "usage": event_usage,
        "cost_usd": cost_usd,
        "upstream_request_id": exchange.upstream_request_id,
        "error": exchange.error,
    }
    return event


def _answer_usage(
    exchange: Exchange,
    request: object,
    response: object,
    decoded: bodies.Decoded,
    response_raw: bytes,
    model: str | None,
) -> tuple[Usage | None, object]:
    """The usage of a generating request's answer, and the body that carried it (for its
    cached tokens): the upstream's own where it sent it, else counted from the bodies."""
    event_usage = usage.from_upstream(response)
    usage_body = response
    if event_usage is None and isinstance(response, list):
        # A stream of events that are not reassembled: its usage is on one of them.
        carried = usage.from_events(response)
        if carried is not None:
            event_usage, usage_body = carried
    if event_usage is None and decoded.truncated and not exchange.response_content_encoding:
        # The usage of an answer longer than the capture is at its end, past the head kept.
        found = usage.usage_in_tail(
            response_raw[-RESPONSE_TAIL_BYTES:] + exchange.response_body.tail
        )
        if found is not None:
            event_usage, usage_body = usage.from_upstream(found), found
    # Only a successful answer consumed tokens worth counting; an error or a body we could not
    # decode gets no usage rather than a made-up one. A client that left before its answer
    # began counts its prompt: hanging up just before a long answer must not be free.
    if event_usage is None and (
        exchange.left_before_answer or (200 <= exchange.status < 300 and decoded.data is not None)
    ):
        event_usage = usage.estimate(exchange.path, request, response, model)
        if event_usage is not None and decoded.truncated and exchange.is_stream:
            event_usage = _whole_stream(event_usage, exchange, len(response_raw))
    return event_usage, usage_body


def _whole_stream(estimated: Usage, exchange: Exchange, captured: int) -> Usage:
    """The estimate of a stream whose usage never came (its client left, say) and whose capture
    kept only its head: its completion scaled to all the bytes the upstream sent, since a stream's
    events cost about as many bytes per token all along. Counted from the head alone, a long
    stream cut near its end paid for a fraction of what it was sent."""
    passed = exchange.response_body.passed
    if exchange.response_content_encoding or not captured or passed <= captured:
        return estimated
    completion = -(-estimated["completion_tokens"] * passed // captured)  # rounded up
    prompt = estimated["prompt_tokens"]
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        source="estimated",
    )


def answer_unseen(exchange: Exchange, event_usage: Usage | None, reasoning: bool = False) -> bool:
    """Whether the client hung up before the answer began, or in the middle of an answer that is
    no stream before its usage arrived (an upstream sends such an answer once it produced all of
    it), or of a ``reasoning`` model's stream (its hidden reasoning, billed as output, came before
    the words the stream shows): what the answer cost is unknown, and may be all the request
    allowed (counted from the part read, a long answer cut after its first bytes cost its prompt
    alone)."""
    return exchange.left_before_answer or (
        exchange.left_by_client
        and (reasoning or not exchange.is_stream)
        and 200 <= exchange.status < 300
        and (event_usage is None or event_usage["source"] != "upstream")
    )


def _priced(prices: Prices | None, model: str | None) -> bool:
    return prices is not None and prices.lookup(model) is not None


def reasons(prices: Prices | None, model: str | None) -> bool:
    """Whether ``model`` thinks in hidden tokens (``reasoning`` in prices.yaml)."""
    price = prices.lookup(model) if prices is not None else None
    return price is not None and price.reasoning


# The answers of these endpoints carry their usage at their end, where a capture of a long answer
# keeps only the bytes as they came (compressed, no decoder can start there). An image's answer is
# long by itself: the image comes in it, as base64.
_USAGE_AT_ITS_END = re.compile(
    r"/v1/(?:chat/completions|completions|embeddings|responses|images/(?:generations|edits))"
)


def usage_out_of_reach(exchange: Exchange, event_usage: Usage | None) -> bool:
    """Whether a successful answer's usage was out of the event's reach: the answer came
    compressed and longer than the capture, or in a coding nobody decodes. Its tokens are
    unknown; counted from what could be read, they would be too few, or none (an embeddings
    batch whose request was longer than the capture too)."""
    return (
        exchange.response_content_encoding.lower() not in ("", "identity")
        and (exchange.response_body.truncated or event_usage is None)
        and (event_usage is None or event_usage["source"] != "upstream")
        and exchange.method == "POST"
        and 200 <= exchange.status < 300
        and _USAGE_AT_ITS_END.fullmatch(exchange.path) is not None
    )


_UNFINISHED = frozenset({"queued", "in_progress"})
# A stored response or chat completion, or a part of one: /v1/responses/{id}/cancel,
# /v1/chat/completions/{id}; not the calls under /v1/responses that generate or count.
_STORED_OBJECT = re.compile(r"/(?:chat/completions|responses)/(?!(?:compact|input_tokens)/?$)[^/]")


def _in_background(request: object, response: object) -> bool:
    """Whether the answer is a background response the upstream is still producing."""
    return (
        isinstance(request, dict)
        and request.get("background") is True
        and isinstance(response, dict)
        and response.get("status") in _UNFINISHED
    )


# The most output tokens a model writes in one answer when neither the request nor prices.yaml says:
# the largest models' own cap.
_LARGEST_OUTPUT = 128_000


def in_background(event: Event) -> bool:
    """Whether the event's answer is a background response the upstream is still producing (its
    tokens come after the answer, where the proxy never sees them)."""
    request, response = event["request"], event["response"]
    return (
        event["method"] == "POST"
        and not _STORED_OBJECT.search(event["path"])
        and isinstance(response, dict)
        and response.get("status") in _UNFINISHED
        and (_in_background(request, response) or response.get("background") is True)
    )


def most_tokens(event: Event, prices: Prices) -> int:
    """The most tokens the event's request can use, for an answer nobody saw whole: its prompt
    (counted offline) and its output cap (the request's, else the model's own in prices.yaml, else
    the largest any model writes). A tpm window counts this, as a budget pays all it held."""
    request, model = event["request"], event["model"]
    # (A request too large to keep shows no prompt: its cap still counts.)
    prompt = usage.estimate(event["path"], request, None, model)
    honoured = HONOURED_CAPS.get(event["path"], ())
    cap = _cap(request, honoured) or _cap(event["response"], honoured)
    if cap is None:
        price = prices.lookup(model)
        cap = price.max_output_tokens if price is not None else None
    return (prompt["prompt_tokens"] if prompt else 0) + (cap or _LARGEST_OUTPUT)


def _cap(body: object, honoured: tuple[str, ...]) -> int | None:
    """The output cap ``body`` gives in a field its endpoint reads (a cap in another bounds
    nothing: the upstream ignores it)."""
    if not isinstance(body, dict):
        return None
    caps = [body.get(name) for name in honoured]
    return max((c for c in caps if type(c) is int and c > 0), default=None)


def _cost_usd(
    prices: Prices | None,
    model: str | None,
    event_usage: Usage | None,
    response: object,
    answered: bool,
) -> float | None:
    """What the request cost by the prices in force: None when its model has none or when an
    answer's tokens are unknown (a body in a coding nobody decodes, speech, a background response
    still being produced), 0 when the upstream refused it or it generated nothing (a fetch). A
    budget hold settles an unknown cost as all it held, never as nothing."""
    price = prices.lookup(model) if prices is not None else None
    if price is None:
        return None
    if event_usage is None:
        return None if answered else 0.0
    cached = usage.cached_prompt_tokens(response) if event_usage["source"] == "upstream" else 0
    return usd(
        cost_nanousd(price, event_usage["prompt_tokens"], cached, event_usage["completion_tokens"])
    )


def _usage_held(
    prices: Prices | None, model: str | None, estimated: Usage | None, held_nanousd: int
) -> Usage | None:
    """The usage a hold paid for: the estimated prompt and as many output tokens as the rest of
    the hold buys (the output cap it was reserved for)."""
    price = prices.lookup(model) if prices is not None else None
    if estimated is None or price is None or not price.output:
        return estimated
    prompt = estimated["prompt_tokens"]
    rest = held_nanousd - cost_nanousd(price, prompt, 0, 0)
    completion = max(rest * 1_000_000 // price.output, 0)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        source="estimated",
    )


def _model(body: object) -> str | None:
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) and model else None


@dataclass(slots=True)
class Built:
    events: list[Event] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # request id, error


def build_batch(
    exchanges: Sequence[Exchange], build_one: Callable[[Exchange], Event] = build
) -> Built:
    """Build a batch, collecting failures instead of raising: it runs in a worker thread, and the
    pipeline logs and counts them."""
    built = Built()
    for exchange in courteously(exchanges):
        try:
            built.events.append(build_one(exchange))
        except Exception as exc:  # one odd body must not cost the rest of the batch
            built.failures.append((exchange.request_id, repr(exc)))
    return built
