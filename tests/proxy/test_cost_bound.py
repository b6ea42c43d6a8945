"""The cost bound of a request: never below what OpenAI bills as prompt tokens, not far above it for
plain text, robust against bodies crafted to hide their size; and the output cap insertion."""

from __future__ import annotations

import base64
import json
import random
from typing import Any

import orjson
import pytest

from llm_proxy import tokens
from llm_proxy.events import usage
from llm_proxy.proxy.cost_bound import (
    CAP_FIELDS,
    FILE_BOUND,
    HOSTED_TOOL_BOUND,
    IMAGE_BOUND,
    OUTPUT_CAP_FIELDS,
    STORED_STATE_BOUND,
    prompt_token_bound,
    with_output_cap,
)

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"

# gpt-4o-mini bills a high-detail image at 2,833 + 5,667 per 512 px tile; an image fitted into
# 2048 x 2048 with its shortest side scaled to 768 px covers at most 2 x 4 tiles.
WORST_IMAGE = 2_833 + 8 * 5_667

WEATHER_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]

# "How to count tokens with tiktoken" (OpenAI cookbook): the API billed 129 prompt tokens for these
# messages on gpt-3.5-turbo and gpt-4, 124 on gpt-4o and gpt-4o-mini.
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]
# Same cookbook: with WEATHER_TOOLS and these messages the API billed 105 prompt tokens on
# gpt-3.5-turbo and gpt-4, 101 on gpt-4o and gpt-4o-mini.
COOKBOOK_TOOL_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]

PROSE = (
    "The proxy reserves the most a request can cost before it forwards it, and settles the real "
    "cost when the answer arrives. Budgets are enforced per token; a token without a budget is "
    "never slowed down by this. "
)


def bound(request: dict[str, Any], model: str | None = "gpt-4o") -> int:
    return prompt_token_bound(orjson.dumps(request), model)


def estimate(path: str, request: dict[str, Any], model: str | None = "gpt-4o") -> int:
    result = usage.estimate(path, request, None, model)
    assert result is not None
    return result["prompt_tokens"]


def count(text: str, model: str | None = "gpt-4o") -> int:
    return tokens.count(text, model)


def cookbook_tool_tokens(tools: list[dict[str, Any]], model: str) -> int:
    """The tools' share of the prompt, by the cookbook's num_tokens_for_tools (gpt-4o rules)."""
    total = 0
    for tool in tools:
        function = tool["function"]
        total += 7 + count(
            function["name"] + ":" + function["description"].removesuffix("."), model
        )
        properties = function["parameters"]["properties"]
        if properties:
            total += 3
            for name, spec in properties.items():
                total += 3
                if "enum" in spec:
                    total += -3 + sum(3 + count(str(item), model) for item in spec["enum"])
                line = f"{name}:{spec['type']}:{spec.get('description', '').removesuffix('.')}"
                total += count(line, model)
    return total + 12


REALISTIC: list[tuple[str, dict[str, Any]]] = [
    (
        CHAT,
        {
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "You are a terse assistant. Answer in one line."},
                {"role": "user", "content": "What's the weather in Paris and in Zürich?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {
                                "name": "get_current_weather",
                                "arguments": '{"location": "Paris, FR", "unit": "celsius"}',
                            },
                        },
                        {
                            "id": "call_2",
                            "type": "function",
                            "function": {
                                "name": "get_current_weather",
                                "arguments": '{"location": "Zürich, CH"}',
                            },
                        },
                    ],
                },
                {
                    "role": "tool",
                    "tool_call_id": "call_1",
                    "content": '{"temp": 21, "sky": "clear"}',
                },
                {
                    "role": "tool",
                    "tool_call_id": "call_2",
                    "content": '{"temp": 17, "sky": "rain"}',
                },
                {"role": "user", "name": "alice", "content": "Thanks! And tomorrow?"},
            ],
            "tools": WEATHER_TOOLS,
            "tool_choice": "auto",
            "temperature": 0.2,
        },
    ),
    (
        CHAT,
        {
            "model": "gpt-4o",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Compare these two paragraphs:"},
                        {"type": "text", "text": PROSE * 3},
                        {"type": "text", "text": PROSE[::-1]},
                    ],
                }
            ],
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "comparison",
                    "schema": {
                        "type": "object",
                        "properties": {"same": {"type": "boolean"}, "why": {"type": "string"}},
                        "required": ["same", "why"],
                        "additionalProperties": False,
                    },
                    "strict": True,
                },
            },
        },
    ),
    (
        RESPONSES,
        {
            "model": "gpt-4.1",
            "instructions": "You are a careful reviewer. Point out every bug.",
            "input": [
                {"role": "user", "content": "Review this:\n\ndef f(x):\n    return x +* 2\n"},
                {"type": "message", "role": "assistant", "content": "Line 2 has a syntax error."},
                {
                    "role": "user",
                    "content": [{"type": "input_text", "text": "And this? " + PROSE}],
                },
                {"type": "function_call_output", "call_id": "c1", "output": '{"ok": true}'},
            ],
            "max_output_tokens": 500,
        },
    ),
    (RESPONSES, {"model": "gpt-4o", "input": "Write a haiku about budgets. " + PROSE}),
    (COMPLETIONS, {"model": "gpt-3.5-turbo-instruct", "prompt": "Once upon a time, " + PROSE}),
    (COMPLETIONS, {"model": "gpt-3.5-turbo-instruct", "prompt": ["First prompt.", PROSE, "Last"]}),
    (COMPLETIONS, {"model": "davinci-002", "prompt": [15339, 1917, 0, 100257, 99999]}),
    (COMPLETIONS, {"model": "davinci-002", "prompt": [[15339, 1917], [40, 1093, 499, 13]]}),
    (EMBEDDINGS, {"model": "text-embedding-3-small", "input": [PROSE, "short", "日本語の文"]}),
    (EMBEDDINGS, {"model": "text-embedding-3-small", "input": "A single string input."}),
    (EMBEDDINGS, {"model": "text-embedding-3-small", "input": [[15339, 1917], [40, 1093]]}),
    (
        CHAT,
        {
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "你是一个乐于助人的助手。请用中文回答。"},
                {"role": "user", "content": "为什么天空是蓝色的？🌤️🎉 请详细解释瑞利散射。" * 20},  # noqa: RUF001
                {"role": "assistant", "content": "因为瑞利散射 🔬✨ 使短波长的蓝光散射得更多。"},
                {"role": "user", "content": "Émojis 👩‍👩‍👧‍👦 and naïve café façade, ½ ∑ ∞ ≠ ≈"},
            ],
        },
    ),
    (
        CHAT,
        {
            "model": "gpt-4o",
            "messages": [
                {
                    "role": "user",
                    "content": 'Quote: "hello"\nTab:\there\r\nBackslash: \\ Slash: / é ü\u2028'
                    '\u0000\u001f {"json": "inside", "n": [1, 2]}',
                },
                {"role": "assistant", "content": "```python\nprint('hi')\n```\n\n\n\n" * 30},
            ],
        },
    ),
]


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4", None])
@pytest.mark.parametrize(("path", "request_body"), REALISTIC)
def test_bound_is_at_least_the_offline_count_of_realistic_requests(
    path: str, request_body: dict[str, Any], model: str | None
) -> None:
    expected = estimate(path, request_body, model)
    assert bound(request_body, model) >= expected
    # Escaped forms (Python's json.dumps escapes every non-ASCII character) count the same text.
    escaped = json.dumps(request_body, indent=2).encode()
    assert prompt_token_bound(escaped, model) >= expected


@pytest.mark.parametrize(
    ("model", "billed"),
    [("gpt-3.5-turbo", 129), ("gpt-4-0613", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124)],
)
def test_bound_covers_the_cookbook_chat_example(model: str, billed: int) -> None:
    request = {"model": model, "messages": COOKBOOK_MESSAGES}
    assert estimate(CHAT, request, model) == billed  # the count reproduces OpenAI's bill here
    assert billed <= bound(request, model) <= 2 * billed  # cautious, not wildly so


@pytest.mark.parametrize(
    ("model", "billed"),
    [("gpt-3.5-turbo", 105), ("gpt-4", 105), ("gpt-4o", 101), ("gpt-4o-mini", 101)],
)
def test_bound_covers_the_cookbook_tools_example(model: str, billed: int) -> None:
    request = {"model": model, "messages": COOKBOOK_TOOL_MESSAGES, "tools": WEATHER_TOOLS}
    assert bound(request, model) >= billed
    assert bound(request, model) >= estimate(CHAT, request, model)


def test_bound_covers_tool_schemas_with_long_enums() -> None:
    """Each enum item costs 3 tokens plus its text in OpenAI's rendering of a tool."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": f"set_option_{i}",
                "description": "Set an option.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        f"option_{j}": {
                            "type": "string",
                            "description": "Which one.",
                            "enum": [f"v{k}" for k in range(60)],
                        }
                        for j in range(4)
                    },
                },
            },
        }
        for i in range(5)
    ]
    request = {"model": "gpt-4o", "messages": COOKBOOK_TOOL_MESSAGES, "tools": tools}
    messages = estimate(CHAT, {"messages": COOKBOOK_TOOL_MESSAGES})
    assert bound(request) >= messages + cookbook_tool_tokens(tools, "gpt-4o")
    assert bound(request) >= estimate(CHAT, request)


def test_plain_text_chat_is_not_wildly_overestimated() -> None:
    random.seed(3)
    sentences = PROSE.split(". ")
    messages = [
        {
            "role": "user" if i % 2 else "assistant",
            "content": " ".join(random.choice(sentences) for _ in range(8)),
        }
        for i in range(10)
    ]
    request = {"model": "gpt-4o", "messages": messages}
    assert 2_000 < len(orjson.dumps(request)) < 20_000  # a few KB
    expected = estimate(CHAT, request)
    assert expected <= bound(request) <= 1.25 * expected


def test_long_text_is_counted_in_full() -> None:
    text = "".join(f"Paragraph {i}: {PROSE}\n\n" for i in range(500))  # ~120 KB, cut in pieces
    request = {"messages": [{"role": "user", "content": text}]}
    assert count(text) <= bound(request) <= count(text) + 100


def test_a_long_run_of_whitespace_does_not_break_the_count() -> None:
    """tiktoken's o200k regex overflows its stack on about a million spaces."""
    request = {"messages": [{"role": "user", "content": " " * 1_200_000 + "x"}]}
    assert bound(request) >= count(" " * 900_000)


def test_pre_tokenised_prompts_count_one_token_per_integer() -> None:
    ids = list(range(100_000, 102_000))
    requests: list[tuple[str, dict[str, Any]]] = [
        (COMPLETIONS, {"model": "davinci-002", "prompt": ids}),
        (EMBEDDINGS, {"model": "text-embedding-3-small", "input": [ids[:1000], ids[1000:]]}),
    ]
    for path, request in requests:
        assert len(ids) == estimate(path, request) <= bound(request) <= len(ids) + 50


def test_numbers_outside_token_arrays_count_their_digits() -> None:
    """A tool schema's numbers are rendered as text, e.g. ``1000000000001 | 1000000000002``."""
    values = [10**12 + i for i in range(50)]
    schema = {"type": "integer", "enum": values}
    assert bound({"tools": [schema]}) >= count(" | ".join(map(str, values)))


def test_a_duplicate_key_cannot_hide_text() -> None:
    huge = PROSE * 200
    body = (
        b'{"model":"gpt-4o","messages":[{"role":"user","content":'
        + orjson.dumps(huge)
        + b',"content":"hi"}]}'
    )
    assert prompt_token_bound(body, "gpt-4o") >= count(huge) + count("hi")
    reversed_body = body.replace(orjson.dumps(huge), b'"hi"', 1).replace(
        b'"content":"hi"}', b'"content":' + orjson.dumps(huge) + b"}"
    )
    assert orjson.loads(reversed_body)["messages"][0]["content"] == huge
    assert prompt_token_bound(reversed_body, "gpt-4o") >= count(huge)


def test_escaped_keys_are_recognised() -> None:
    assert prompt_token_bound(b'{"previous\\u005fresponse\\u005fid":"resp_1"}', None) >= (
        STORED_STATE_BOUND
    )
    chat_image = (
        b'{"messages":[{"role":"user","content":[{"type":"\\u0069mage_url",'
        b'"\\u0069\\u006d\\u0061\\u0067\\u0065\\u005f\\u0075\\u0072\\u006c":{"url":"https://x/y.png"}}]}]}'
    )
    assert prompt_token_bound(chat_image, None) >= WORST_IMAGE


def test_a_lone_surrogate_is_counted_in_its_escaped_form() -> None:
    body = b'{"messages":[{"role":"user","content":"\\ud800 hello \\udfff"}]}'
    assert prompt_token_bound(body, None) >= count("\\ud800 hello \\udfff")


def chat_with(part: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}
        ],
    }


def responses_with(part: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "What is this?"}, part]}
        ],
        **extra,
    }


TEXT_ONLY_CHAT = chat_with({"type": "text", "text": "x"})
TEXT_ONLY_RESPONSE = responses_with({"type": "input_text", "text": "x"})


@pytest.mark.parametrize(
    "request_body",
    [
        chat_with({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}),
        chat_with(
            {"type": "image_url", "image_url": {"detail": "high", "url": "https://e.com/a.jpg"}}
        ),
        responses_with({"type": "input_image", "image_url": "https://example.com/cat.png"}),
        responses_with({"type": "input_image", "file_id": "file-abc"}),
    ],
)
def test_an_image_is_bounded_by_the_dearest_image(request_body: dict[str, Any]) -> None:
    assert bound(request_body, "gpt-4o-mini") >= WORST_IMAGE + estimate(
        CHAT if "messages" in request_body else RESPONSES, request_body, "gpt-4o-mini"
    )


def test_a_megabyte_data_url_image_costs_the_image_bound_not_its_text() -> None:
    data = base64.b64encode(random.Random(1).randbytes(750_000)).decode()
    url = "data:image/png;base64," + data
    chat = chat_with({"type": "image_url", "image_url": {"url": url, "detail": "high"}})
    response = responses_with({"type": "input_image", "image_url": url})
    assert bound(TEXT_ONLY_CHAT) + WORST_IMAGE <= bound(chat)
    assert bound(chat) <= bound(TEXT_ONLY_CHAT) + 2 * IMAGE_BOUND + 20
    assert bound(TEXT_ONLY_RESPONSE) + WORST_IMAGE <= bound(response)
    assert bound(response) <= bound(TEXT_ONLY_RESPONSE) + 2 * IMAGE_BOUND + 20


def test_a_data_url_outside_an_image_slot_counts_as_text() -> None:
    url = "data:image/png;base64," + base64.b64encode(random.Random(2).randbytes(30_000)).decode()
    for request in [
        chat_with({"type": "text", "text": url}),
        {"messages": [{"role": "user", "content": url}]},
        # "url" outside an "image_url" object is not an image slot
        {"messages": [{"role": "user", "content": "hi", "url": url}]},
        {"image_url": {"nested": {"url": url}}},
    ]:
        assert bound(request) >= count(url)


@pytest.mark.parametrize(
    "part",
    [
        {"type": "file", "file": {"file_id": "file-abc"}},
        {
            "type": "file",
            "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,"},
        },
    ],
)
def test_a_chat_file_adds_the_file_bound(part: dict[str, Any]) -> None:
    assert bound(chat_with(part)) >= bound(TEXT_ONLY_CHAT) + FILE_BOUND


def test_inline_file_data_costs_the_file_bound_not_its_text() -> None:
    pdf = base64.b64encode(random.Random(3).randbytes(1_500_000)).decode()
    for file_data in ("data:application/pdf;base64," + pdf, pdf):
        part = {"type": "input_file", "filename": "a.pdf", "file_data": file_data}
        added = bound(responses_with(part)) - bound(TEXT_ONLY_RESPONSE)
        assert FILE_BOUND <= added <= FILE_BOUND + 20
    part = {"type": "input_file", "file_url": "https://example.com/a.pdf"}
    assert bound(responses_with(part)) >= bound(TEXT_ONLY_RESPONSE) + FILE_BOUND


@pytest.mark.parametrize(
    "extra",
    [
        {"previous_response_id": "resp_123"},
        {"conversation": "conv_123"},
        {"conversation": {"id": "conv_123"}},
        {"prompt": {"id": "pmpt_123", "variables": {"city": "Paris"}}},
    ],
)
def test_stored_state_adds_a_full_context_window(extra: dict[str, Any]) -> None:
    assert bound(responses_with({"type": "input_text", "text": "x"}, **extra)) >= (
        bound(TEXT_ONLY_RESPONSE) + STORED_STATE_BOUND
    )


@pytest.mark.parametrize(
    "extra",
    [
        {"previous_response_id": None},
        {"conversation": None},
        {"metadata": {"note": "previous_response_id"}},
        {"tools": [{"type": "function", "name": "mcp", "parameters": {}}]},
    ],
)
def test_null_or_unrelated_mentions_add_no_fixed_bound(extra: dict[str, Any]) -> None:
    assert bound(responses_with({"type": "input_text", "text": "x"}, **extra)) < 1_000


@pytest.mark.parametrize(
    "tool",
    [
        {"type": "web_search"},
        {"type": "web_search_preview", "search_context_size": "high"},
        {"type": "file_search", "vector_store_ids": ["vs_1"]},
        {"type": "code_interpreter", "container": {"type": "auto"}},
        {"type": "mcp", "server_label": "x", "server_url": "https://x"},
    ],
)
def test_hosted_tools_add_a_full_context_window(tool: dict[str, Any]) -> None:
    request = responses_with({"type": "input_text", "text": "x"}, tools=[tool])
    assert bound(request) >= bound(TEXT_ONLY_RESPONSE) + HOSTED_TOOL_BOUND


def test_chat_web_search_adds_a_full_context_window() -> None:
    request = {**TEXT_ONLY_CHAT, "web_search_options": {}}
    assert bound(request) >= bound(TEXT_ONLY_CHAT) + HOSTED_TOOL_BOUND


def test_every_endpoint_has_a_known_cap_field() -> None:
    assert set(OUTPUT_CAP_FIELDS.values()) <= set(CAP_FIELDS)
    assert OUTPUT_CAP_FIELDS[CHAT] == "max_completion_tokens"
    assert OUTPUT_CAP_FIELDS[RESPONSES] == "max_output_tokens"
    assert OUTPUT_CAP_FIELDS[COMPLETIONS] == "max_tokens"


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}',
        b'  \n\t{ "model" : "gpt-4o" ,\n  "input": "x\\"y{}" }\n',
        b'{"max_tokens_hint":1,"stream":true,"nested":{"a":[1,{}]}}',
        b'{"a":"\xc3\xa9\\u00e9"}',
    ],
)
@pytest.mark.parametrize("field", sorted(set(OUTPUT_CAP_FIELDS.values())))
def test_output_cap_is_added_as_the_first_member(body: bytes, field: str) -> None:
    capped = with_output_cap(body, field, 4096)
    parsed = orjson.loads(capped)
    assert parsed[field] == 4096
    assert next(iter(parsed)) == field
    assert {k: v for k, v in parsed.items() if k != field} == orjson.loads(body)
    brace = body.index(b"{")
    assert capped.startswith(body[: brace + 1] + b'"' + field.encode() + b'":4096,')
    assert capped.endswith(body[brace + 1 :])
    assert len(capped) == len(body) + len(f'"{field}":4096,')


@pytest.mark.parametrize("body", [b"{}", b"{ }", b" {\n}\n"])
def test_output_cap_in_an_empty_object(body: bytes) -> None:
    capped = with_output_cap(body, "max_output_tokens", 0)
    assert orjson.loads(capped) == {"max_output_tokens": 0}
    assert capped.endswith(body[body.index(b"{") + 1 :])


@pytest.mark.parametrize(("body", "cap"), [(b"[1]", 1), (b"", 1), (b"{}", -1)])
def test_output_cap_refuses_what_it_cannot_do(body: bytes, cap: int) -> None:
    with pytest.raises(ValueError):
        with_output_cap(body, "max_tokens", cap)
