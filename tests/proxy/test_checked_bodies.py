"""Bodies whose `model` and parameters a check must read (a `param_whitelist`, a token's
`allowed_models`): a JSON object is read as JSON, a form as a form, and anything the proxy cannot
read that way is refused before any byte of it reaches the upstream, since a Python upstream's
``json.loads`` reads a byte order mark, UTF-16 and UTF-32, and Starlette reads forms."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import orjson
import pytest

from tests.conftest import Proxy
from tests.http.test_front import read_response

WHITELIST = {"param_whitelist": {"model": ["gpt-4o*"]}}
OTHER = {"model": "gpt-3.5-turbo", "messages": []}

UNREADABLE = {
    "a BOM": b"\xef\xbb\xbf" + orjson.dumps(OTHER),
    "UTF-16-BE": orjson.dumps(OTHER).decode().encode("utf-16-be"),
    "UTF-16 with a BOM": orjson.dumps(OTHER).decode().encode("utf-16"),
    "UTF-32-BE": orjson.dumps(OTHER).decode().encode("utf-32-be"),
    "an array": orjson.dumps([OTHER]),
    "a BOM, large": b"\xef\xbb\xbf"
    + orjson.dumps({**OTHER, "messages": [{"role": "user", "content": "x" * 2_000_000}]}),
}


def bearer(token: str, content_type: str = "application/json") -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": content_type}


async def refusal(response: Any) -> tuple[int, str]:
    body = await response.json()
    return response.status, str(body["error"]["code"])


def multipart(*parts: tuple[bytes, bytes], boundary: bytes = b"B0und4ry") -> bytes:
    """A multipart/form-data body of (Content-Disposition parameters, content) parts."""
    out = b""
    for disposition, content in parts:
        out += b"--%s\r\nContent-Disposition: form-data; %s\r\n\r\n%s\r\n" % (
            boundary,
            disposition,
            content,
        )
    return out + b"--%s--\r\n" % boundary


MULTIPART = "multipart/form-data; boundary=B0und4ry"
URLENCODED = "application/x-www-form-urlencoded"


@pytest.mark.parametrize("name", UNREADABLE)
async def test_a_body_that_is_not_a_json_object_cannot_pass_the_whitelist(
    proxy_factory: Any, name: str
) -> None:
    proxy: Proxy = await proxy_factory(api=WHITELIST)
    response = await proxy.client.post(
        "/v1/chat/completions",
        data=io.BytesIO(UNREADABLE[name]),
        headers=bearer(await proxy.token()),
    )
    assert await refusal(response) == (400, "param_not_allowed")
    assert "neither a JSON object" in (await response.json())["error"]["message"]
    assert proxy.upstream.requests == []


@pytest.mark.parametrize(
    "body",
    [b"\xef\xbb\xbf{}", b'\xef\xbb\xbf{"model":"gpt-4o","messages":[]}', UNREADABLE["UTF-16-BE"]],
    ids=["BOM-no-model", "BOM-other-model", "UTF-16"],
)
async def test_a_body_that_is_not_a_json_object_cannot_pass_a_model_limit(
    proxy: Proxy, body: bytes
) -> None:
    token = await proxy.token(allowed_models=["gpt-4o-mini*"])
    response = await proxy.client.post("/v1/chat/completions", data=body, headers=bearer(token))
    assert await refusal(response) == (403, "model_not_allowed")
    assert response.headers["x-should-retry"] == "false"
    assert proxy.upstream.requests == []


async def test_the_model_field_of_a_form_is_checked(proxy_factory: Any) -> None:
    proxy: Proxy = await proxy_factory(api=WHITELIST)
    limited = await proxy.token(allowed_models=["gpt-4o-mini*"])
    audio = b"RIFF" + bytes(range(256)) * 8192  # 2 MiB: spooled, never held in memory whole

    def edit(model: bytes) -> bytes:
        return multipart((b'name="file"; filename="model.wav"', audio), (b'name="model"', model))

    for token, model, refused in (
        (await proxy.token(), b"gpt-image-1", (400, "param_not_allowed")),
        (limited, b"gpt-4o", (403, "model_not_allowed")),
    ):
        response = await proxy.client.post(
            "/v1/audio/translations", data=io.BytesIO(edit(model)), headers=bearer(token, MULTIPART)
        )
        assert await refusal(response) == refused
        form = b"prompt=x&mod%65l=" + model  # the name decoded as a form parser does
        response = await proxy.client.post(
            "/v1/audio/transcriptions", data=form, headers=bearer(token, URLENCODED)
        )
        assert await refusal(response) == refused
    no_model = multipart((b'name="purpose"', b"batch"), (b'name="file"; filename="x"', b"{}"))
    response = await proxy.client.post(
        "/v1/files/upload", data=no_model, headers=bearer(limited, MULTIPART)
    )
    assert await refusal(response) == (403, "model_not_allowed")  # the upstream would pick one
    # A JSON object sent as a form: read both ways, as an upstream may read it either way.
    hidden = b'{"model":"gpt-4o-mini","x":"&model=gpt-3.5-turbo&"}'
    response = await proxy.client.post(
        "/v1/chat/completions", data=hidden, headers=bearer(limited, URLENCODED)
    )
    assert await refusal(response) == (400, "param_not_allowed")
    assert proxy.upstream.requests == []
    allowed = multipart(
        (b'name="file"; filename="a.wav"', audio), (b'name="model"', b"gpt-4o-mini")
    )
    response = await proxy.client.post(
        "/v1/files/upload", data=io.BytesIO(allowed), headers=bearer(limited, MULTIPART)
    )
    assert response.status == 200
    assert proxy.upstream.last.body == allowed  # unchanged, byte for byte
    response = await proxy.client.post(
        "/v1/files/upload", data=b"model=gpt-4o-mini-tts", headers=bearer(limited, URLENCODED)
    )
    assert response.status == 200


@pytest.mark.parametrize(
    "body",
    [
        multipart((b"name*=UTF-8''model; name=\"prompt\"", b"gpt-3.5-turbo")),
        multipart((b'name="prompt"; name="model"', b"gpt-3.5-turbo")),
        multipart((b'name="prompt"\r\nContent-Disposition: form-data; name="model"', b"x")),
        # aiohttp reads "model" (a backslash escapes any character); python-multipart "mod\el".
        multipart((b'name="mod\\el"', b"gpt-3.5-turbo"), (b'name="model"', b"gpt-4o")),
        multipart((b'name="model"', b"gpt-4o"))[:-4],  # cut before its closing boundary
        b"model=gpt-4o",  # not multipart at all
        multipart(
            (b'name="model"; pad="' + b"p" * 20_000 + b'"', b"gpt-4o")
        ),  # (python-multipart caps a part header at 4 KiB)
    ],
    ids=[
        "rfc2231-name",
        "two-names",
        "two-dispositions",
        "escaped-name",
        "unterminated",
        "not-multipart",
        "long-part-header",
    ],
)
async def test_a_form_parsers_could_read_differently_is_refused(
    proxy_factory: Any, body: bytes
) -> None:
    proxy: Proxy = await proxy_factory(api=WHITELIST)
    response = await proxy.client.post(
        "/v1/audio/transcriptions", data=body, headers=bearer(await proxy.token(), MULTIPART)
    )
    assert await refusal(response) == (400, "bad_request")
    assert proxy.upstream.requests == []


async def test_a_checked_body_with_two_content_types_is_refused(proxy_factory: Any) -> None:
    proxy: Proxy = await proxy_factory(api=WHITELIST)
    token = await proxy.token()
    body = b'{"model":"gpt-4o","x":"&model=gpt-3.5-turbo"}'
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
        % (token.encode(), URLENCODED.encode(), len(body))
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.port)
    writer.write(head + body)
    status, _, answer = await read_response(reader)
    writer.close()
    assert (status, orjson.loads(answer)["error"]["code"]) == (400, "bad_request")
    assert proxy.upstream.requests == []


@pytest.mark.parametrize(
    "content_type",
    [
        "multipart/form-data; boundary=Forbidden; boundary=Allowed",
        "multipart/form-data; boundary=Forbidden; BOUNDARY=Allowed",
        "multipart/form-data; boundary=Forbidden, multipart/form-data; boundary=Allowed",
        "multipart/form-data; boundary*=UTF-8''Forbidden; boundary=Allowed",
    ],
    ids=["two-boundaries", "two-cases", "comma-joined", "rfc2231"],
)
async def test_a_form_whose_boundary_parsers_could_read_differently_is_refused(
    proxy: Proxy, content_type: str
) -> None:
    # python-multipart (the proxy's and Starlette's parser) takes the last boundary parameter;
    # aiohttp, Python's email package and others take the first, and skip what comes before it:
    # each finds the model part under its own boundary, the other form being preamble or epilogue.
    token = await proxy.token(allowed_models=["gpt-4o-mini*"])
    audio = (b'name="file"; filename="a.wav"', b"RIFF")
    allowed = multipart((b'name="model"', b"gpt-4o-mini"), audio, boundary=b"Allowed")
    forbidden = multipart((b'name="model"', b"gpt-4o"), audio, boundary=b"Forbidden")
    response = await proxy.client.post(
        "/v1/audio/transcriptions", data=allowed + forbidden, headers=bearer(token, content_type)
    )
    assert await refusal(response) == (400, "bad_request")
    assert proxy.upstream.requests == []
    # One boundary, quoted or not, is read as before.
    for boundary in ("Allowed", '"Allowed"'):
        response = await proxy.client.post(
            "/v1/audio/transcriptions",
            data=allowed,
            headers=bearer(token, f"multipart/form-data; charset=utf-8; boundary={boundary}"),
        )
        assert response.status == 200
