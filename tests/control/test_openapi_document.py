"""The OpenAPI document of the management API: valid OpenAPI 3.1, one operation per route served,
named and tagged for generated clients, its schemas built from the API's own bounds."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from typing import Any

import openapi_spec_validator
import orjson
from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.protocols import Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from llm_proxy.control.openapi import (
    ERROR_CODES_KEYWORD,
    MAX_JSON_BYTES_KEYWORD,
    NOT_BLANK,
    SENDABLE_KEY,
    openapi_document,
)
from llm_proxy.control.operations import (
    MAX_ALLOWED_MODELS,
    MAX_BUDGET_USD,
    MAX_COUNT,
    MAX_DURATION_MINUTES,
    MAX_MODEL_PATTERN_LENGTH,
    MAX_TOKEN_METADATA_BYTES,
)
from llm_proxy.crypto import is_sendable_key
from tests.conftest import TOKEN_FIELDS, Proxy

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
LIMITS = ("max_requests", "rpm", "tpm", "budget_usd", "allowed_models")


def _max_json_bytes(
    validator: Validator, limit: int, instance: Any, schema: dict[str, Any]
) -> Iterator[ValidationError]:
    """The document's one keyword beyond JSON Schema: a value's size as compact UTF-8 JSON."""
    if validator.is_type(instance, "object") and len(orjson.dumps(instance)) > limit:
        yield ValidationError(f"more than {limit} bytes as JSON")


_DocumentValidator = validators.extend(
    Draft202012Validator, {MAX_JSON_BYTES_KEYWORD: _max_json_bytes}
)


def schema_validator(document: dict[str, Any], schema: dict[str, Any]) -> Validator:
    """A validator for ``schema``, whose references point into ``document``."""
    resource = Resource.from_contents(document, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource("urn:manage", resource)
    rebased = orjson.loads(orjson.dumps(schema).replace(b'"#/', b'"urn:manage#/'))
    validator: Validator = _DocumentValidator(rebased, registry=registry)
    return validator


def component(document: dict[str, Any], name: str) -> Validator:
    return schema_validator(document, {"$ref": f"#/components/schemas/{name}"})


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(METHOD, path, operation) for every operation of the document."""
    for path, item in document["paths"].items():
        for method in HTTP_METHODS:
            if method in item:
                yield method.upper(), path, item[method]


def resolve(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def response_schema(document: dict[str, Any], operation: dict[str, Any], status: int) -> Any:
    """The documented answer of ``operation`` with ``status``: its JSON schema, or None when it
    has no body; KeyError when the status is not documented."""
    response = resolve(document, operation["responses"][str(status)])
    content = response.get("content", {}).get("application/json")
    return None if content is None else content["schema"]


def error_codes(document: dict[str, Any], operation: dict[str, Any], status: int) -> list[str]:
    codes: list[str] = resolve(document, operation["responses"][str(status)])[ERROR_CODES_KEYWORD]
    return codes


async def served_document(proxy: Proxy) -> dict[str, Any]:
    response = await proxy.client.get("/manage/openapi.json")
    assert response.status == 200
    document: dict[str, Any] = await response.json()
    return document


async def test_the_document_is_valid_openapi_3_1(proxy: Proxy) -> None:
    document = await served_document(proxy)
    assert document == orjson.loads(orjson.dumps(openapi_document()))
    assert document["openapi"] == "3.1.0"
    openapi_spec_validator.validate(document)
    for schema in document["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)


async def test_every_route_served_is_documented_under_its_handler_name(proxy: Proxy) -> None:
    document = await served_document(proxy)
    documented = {
        (method, path): operation["operationId"] for method, path, operation in operations(document)
    }
    (management,) = [
        r.get_info()["app"]
        for r in proxy.app.router.resources()
        if r.get_info().get("prefix") == "/manage"
    ]
    served = {}
    for resource in management.router.resources():
        info = resource.get_info()
        path = info.get("path", info.get("formatter", ""))
        for route in resource:
            if route.method != "HEAD":  # answered wherever GET is, as the paths say
                served[(route.method, path)] = route.handler.__name__
    assert documented == served


def test_every_operation_has_a_unique_snake_case_id_and_a_declared_tag() -> None:
    document = openapi_document()
    ids = [operation["operationId"] for _, _, operation in operations(document)]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", op_id) for op_id in ids), ids
    declared = [tag["name"] for tag in document["tags"]]
    used = [tag for _, _, operation in operations(document) for tag in operation["tags"]]
    assert all(len(operation["tags"]) == 1 for _, _, operation in operations(document))
    assert set(used) == set(declared)
    assert {"projects", "tokens", "audit"} <= set(declared)


def test_not_blank_is_exactly_what_the_api_trims() -> None:
    pattern = re.compile(NOT_BLANK)
    for point in range(sys.maxunicode + 1):
        char = chr(point)
        assert (pattern.fullmatch(char) is None) == (char.strip() == ""), hex(point)


def test_sendable_key_is_exactly_what_the_api_accepts_as_an_upstream_key() -> None:
    pattern = re.compile(SENDABLE_KEY)
    for point in range(sys.maxunicode + 1):
        char = chr(point)
        for key in (f"k{char}k", f"{char}k", f"k{char}", f"k{char}\n", f" {char}k"):
            accepted = "\x00" not in key and is_sendable_key(key.strip())
            assert (pattern.search(key) is not None) == accepted, (hex(point), key)


def test_request_schemas_state_the_api_bounds() -> None:
    schemas = openapi_document()["components"]["schemas"]
    create, update = schemas["TokenCreate"], schemas["TokenUpdate"]
    assert set(create["properties"]) == {"project_id", "duration_minutes", *LIMITS, "metadata"}
    assert set(update["properties"]) == {"is_active", *LIMITS}
    for name in ("ProjectCreate", "ProjectUpdate", "TokenCreate", "TokenUpdate", "TokenRevoke"):
        assert schemas[name]["additionalProperties"] is False, name
    duration = create["properties"]["duration_minutes"]
    assert (duration["type"], duration["maximum"]) == ("integer", MAX_DURATION_MINUTES)
    for name in ("max_requests", "rpm", "tpm"):
        count = update["properties"][name]
        assert (count["type"], count["minimum"], count["maximum"]) == (
            ["integer", "null"],
            1,
            MAX_COUNT,
        )
    budget = create["properties"]["budget_usd"]
    assert (budget["minimum"], budget["maximum"]) == (1e-9, MAX_BUDGET_USD)
    models = create["properties"]["allowed_models"]
    assert (models["minItems"], models["maxItems"], models["items"]["maxLength"]) == (
        1,
        MAX_ALLOWED_MODELS,
        MAX_MODEL_PATTERN_LENGTH,
    )
    assert schemas["TokenMetadata"][MAX_JSON_BYTES_KEYWORD] == MAX_TOKEN_METADATA_BYTES
    revoke = schemas["TokenRevoke"]["properties"]["token"]
    assert (revoke["minLength"], revoke["pattern"]) == (1, NOT_BLANK)


async def test_answers_fit_the_document(proxy: Proxy) -> None:
    document = await served_document(proxy)
    schemas = document["components"]["schemas"]
    token = schemas["Token"]
    assert set(token["properties"]) == set(token["required"]) | {"usage"}
    assert set(token["properties"]) == TOKEN_FIELDS | {"revoked_at", "usage"}

    project_id = await proxy.create_project()
    _, project = await proxy.manage("GET", f"/projects/{project_id}")
    component(document, "Project").validate(project)
    create = {
        "project_id": project_id,
        "duration_minutes": 5,
        "max_requests": 50,
        "budget_usd": 12.5,
        "allowed_models": ["gpt-4o*"],
        "metadata": {"team": "search"},
    }
    component(document, "TokenCreate").validate(create)
    status, issued = await proxy.manage("POST", "/tokens", create)
    assert status == 201
    component(document, "TokenCreated").validate(issued)
    _, fetched = await proxy.manage("GET", f"/tokens/{issued['id']}")
    component(document, "Token").validate(fetched)
    clear = dict.fromkeys(LIMITS)
    component(document, "TokenUpdate").validate(clear)
    _, patched = await proxy.manage("PATCH", f"/tokens/{issued['id']}", clear)
    component(document, "Token").validate(patched)
    _, listed = await proxy.manage("GET", "/tokens")
    component(document, "Token").validate(listed[0])
    _, counts = await proxy.manage("POST", f"/projects/{project_id}/tokens/revoke")
    component(document, "RevokeResult").validate(counts)
    _, audit = await proxy.manage("GET", "/audit")
    component(document, "AuditPage").validate(audit)
    assert len(audit["events"]) == 4
